"""Names of the special tokens Loupe adds to a base model's tokenizer.

``MASK_TOKEN`` stands in an answer for one mask; the mask decoder turns the hidden state at it
into mask logits. ``LOWLEVEL_TOKEN`` is a placeholder the processor puts ``LOWLEVEL_TOKENS_PER_IMAGE``
times right after each image; the model fills those positions with the LowLevelEncoder's features.
Both must encode to exactly one id once added; the assistant checks this at load time.
"""

MASK_TOKEN = "<|mask|>"
LOWLEVEL_TOKEN = "<|lowlevel|>"
LOWLEVEL_TOKENS_PER_IMAGE = 4

SPECIAL_TOKENS = (MASK_TOKEN, LOWLEVEL_TOKEN)
