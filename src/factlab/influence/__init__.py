"""Empirical influence of fine-tuning samples (Matelsky, Ungar, Kording 2024, arXiv 2406.00509).

EIF[i, j] = L_j(θ_i) − L_j(θ_0): the change of sample j's mean negative log-prob per token of
its scored part after fine-tuning the base model θ_0 on sample i alone. Negative means training
on i made j more likely; the diagonal is the self-influence.
"""
