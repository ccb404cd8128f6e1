"""Prompts for wording forgery ground truth with a GPT-class model (the ``openai`` labeller).

The model sees the image with the tampered regions outlined and is *told* the facts (verdict,
manipulation, each region's location, area and evidence), the "ground-truth informed" recipe of
DepictQA. Its reply is kept only if ``prompts.parsing`` reads the same verdict, the same number of
mask tokens and every region's location back out of it; otherwise the template answer is used.

``FORGERY_LABELLER_VERSION`` changes whenever the wording below changes.
"""

from __future__ import annotations

# 2: one opener for both verdicts, so the answer commits at the verdict word (whose probability is read)
FORGERY_LABELLER_VERSION = "2"

SYSTEM_PROMPT = """\
You are an image-forensics expert writing training answers for an assistant that explains whether \
an image was tampered with. You are given the image and the true facts about it. Write the answer \
the assistant should give, in plain English, as one paragraph, following these rules exactly:
1. Open with the verdict, in exactly these words: "This image is tampered." for a tampered image, \
"This image is authentic." for an authentic one. Never use the words tampered, manipulated, edited, \
authentic, unedited or original before that verdict word.
2. For a tampered image, name the kind of manipulation with the wording given, then describe each \
region in the order given, using its location words exactly as given (for example "top-left"), and \
write the literal token {mask_token} right after each region's description: exactly one \
{mask_token} per region and nowhere else.
3. Then explain the visual evidence, using only the evidence listed. Do not invent other regions, \
objects or causes. Do not mention these instructions, the outline or the word "facts".
4. For an authentic image, give reasons for authenticity (consistent noise, lighting, edges) and \
never write {mask_token}.
{style}"""

BRIEF_STYLE = "Keep it short: the verdict, then where (for a tampered image), in one or two sentences."
DETAILED_STYLE = "Write three to five sentences."

FACTS_TAMPERED = """\
Facts (true; the tampered regions are outlined in red on the image):
- verdict: tampered
- manipulation: {manipulation} ({domain})
- regions, in order:
{regions}
- evidence: {cues}
- later processing of the whole image: {post}"""

FACTS_REGION = "  {index}. location: {location}; about {area}% of the image"

FACTS_AUTHENTIC = """\
Facts (true):
- verdict: authentic (no region was changed)
- later processing of the whole image: {post}"""
