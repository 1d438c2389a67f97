"""Training data: corpus loading and packing (CPT), chat-formatted Q&A with answer-only labels (SFT)."""
