"""Regex pieces shared by the math and arith verifiers for answers written in sentences.

"The answer is 18 dollars." commits to 18; "the answer is 10 times larger" and "the answer is 4 when n is
even" do not. A number counts as a committed answer only if at most three unit words follow it and then
the sentence ends. Both pieces are linear-time: every word starts after blanks and holds no digit, and
the quantifiers are bounded, so no text can make them backtrack more than a few characters.
"""

from __future__ import annotations

# Words that turn "<number> <word>" into prose rather than a number with its unit: "10 times larger",
# "2 more than x", "4 when n is even", "3 or 4", "5 and 6".
NOT_UNITS = (
    "and|or|but|if|when|whenever|where|because|since|unless|until|than|then|so|times|more|less|fewer|"
    "greater|smaller|larger|bigger|higher|lower|plus|minus|over|divided|is|are|was|were|not|only"
)
# Up to three words after a number, such as "dollars", "square feet", "pieces of candy".
UNITS = rf"(?:[ \t]+(?!(?:{NOT_UNITS})\b)[A-Za-z][A-Za-z'-]*){{0,3}}"
# The sentence ends: an optional period (then a closing "**" of bold text) and a line end, or a period
# and a blank before the next sentence. A lookahead: it consumes nothing.
SENTENCE_END = r"(?=[ \t]*(?:[.!]?(?:\*\*)?[ \t]*(?:\n|$)|[.!](?:\*\*)?[ \t]))"
