"""Data: file reading (io), corpus loading and packing (CPT), chat-formatted Q&A with answer-only
labels (SFT), synthetic worlds (synth), augmentation from fact tables (augment), name
substitution (substitute), checks and leakage (checks), the real play (play)."""
