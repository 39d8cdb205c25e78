"""The paper's prompt (docs/math.md section 1) and conversation transcripts.

The prompt is one user turn; the trainer applies the model's chat template on top, with no
system message.
"""

from __future__ import annotations

from collections.abc import Iterable

PROMPT_PREFIX = (
    "Pretend you are a movie recommender system.\n"
    "I will give you a conversation between a user and you (a recommender system). Based on "
    "the conversation, you need to reply with {num_ranks} recommendations. List the "
    "standardized English title of each movie in each line in the form of \"movie name\" "
    "(release_year) with NO extra words or sentences.\n"
    "Here is the conversation: "
)
USER, SYSTEM = "USER", "SYSTEM"


def format_transcript(turns: Iterable[tuple[str, str]]) -> str:
    """`ROLE: text` lines joined by `\\n`; empty utterances are left out."""
    return "\n".join(f"{role}: {text.strip()}" for role, text in turns if text.strip())


def build_prompt(turns: Iterable[tuple[str, str]] | str, num_ranks: int = 20) -> str:
    """The paper's prompt around a conversation.

    `turns` is a list of `(role, text)` with role "USER" or "SYSTEM", or a user's message as
    a plain string (a single-turn conversation, as in Reddit-v2). For a conversation that
    starts with the user this is exactly docs/math.md section 1's
    `...Here is the conversation: USER: {conversation}\\n`; one that the recommender opened
    starts with `SYSTEM: ` instead, so no turn is labelled with the wrong role.
    """
    if isinstance(turns, str):
        turns = [(USER, turns)]
    turns = list(turns)
    for role, _ in turns:
        if role not in (USER, SYSTEM):
            raise ValueError(f"role must be {USER!r} or {SYSTEM!r}, got {role!r}")
    return PROMPT_PREFIX.format(num_ranks=num_ranks) + format_transcript(turns) + "\n"
