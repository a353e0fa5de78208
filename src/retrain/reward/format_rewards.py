"""Format rewards: does the completion have the tagged structure the task asks for?

Tags are written `<name>` and `</name>` exactly (no attributes, case-sensitive); a tag option may
be given as `think` or `<think>`.

>>> think_answer_format(completion="<think>6*7=42</think>\\n<answer>42</answer>")
1.0
>>> xml_tags_present(completion="<think>hm</think> 42", tags=["think", "answer"])
0.5
>>> answer_tag_match(completion="<think>...</think><answer> 42 </answer>", answer=42)
1.0
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from retrain.reward.builtins import _require_answer
from retrain.reward.registry import reward


def _tag_name(name: str, option: str) -> str:
    tag = str(name).strip()
    if tag.startswith("<") and tag.endswith(">"):
        tag = tag[1:-1].strip()
    if tag.startswith("/"):
        tag = tag[1:]
    if not tag or any(c in tag for c in "<>/") or any(c.isspace() for c in tag):
        raise ValueError(f"{option}: {name!r} is not a tag name (give e.g. 'answer' or '<answer>').")
    return tag


def tag_content(text: str, tag: str) -> Optional[str]:
    """The text between the last `<tag>` and the first `</tag>` after it, or None.

    >>> tag_content("<answer>1</answer> <answer>2</answer>", "answer")
    '2'
    >>> tag_content("<answer>unclosed", "answer") is None
    True
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.rfind(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    return None if end < 0 else text[start + len(open_tag) : end]


@reward
def think_answer_format(
    completion: str, think_tag: str = "think", answer_tag: str = "answer", **_: Any
) -> float:
    """1.0 when the completion is exactly `<think>...</think>` then `<answer>...</answer>`.

    Only whitespace may come before, between and after the two blocks; each of the four tags must
    appear exactly once (a second `<answer>` block, or a tag inside the reasoning, fails). A block
    may be empty. `think_tag` and `answer_tag` rename the tags.

    >>> think_answer_format(completion="  <think>\\n2+2</think>\\n\\n<answer>4</answer>\\n")
    1.0
    >>> think_answer_format(completion="<think>2+2</think> so: <answer>4</answer>")  # text between
    0.0
    >>> think_answer_format(completion="<answer>4</answer><think>2+2</think>")  # wrong order
    0.0
    >>> think_answer_format(completion="<think>a</think><answer>4</answer><answer>5</answer>")
    0.0
    >>> think_answer_format(completion="<reason>r</reason><final>4</final>", think_tag="reason", answer_tag="final")
    1.0
    """
    think = _tag_name(think_tag, "think_answer_format.think_tag")
    answer = _tag_name(answer_tag, "think_answer_format.answer_tag")
    if think == answer:
        raise ValueError("think_answer_format: think_tag and answer_tag must differ.")
    tags = [f"<{think}>", f"</{think}>", f"<{answer}>", f"</{answer}>"]
    if any(completion.count(tag) != 1 for tag in tags):
        return 0.0
    pattern = r"\s*{}.*?{}\s*{}.*?{}\s*".format(*(re.escape(tag) for tag in tags))
    return 1.0 if re.fullmatch(pattern, completion, flags=re.DOTALL) else 0.0


@reward
def xml_tags_present(completion: str, tags: Sequence[str] = ("think", "answer"), **_: Any) -> float:
    """The fraction of `tags` present exactly once: one `<tag>`, then one `</tag>` after it.

    A tag repeated, unclosed, or closed before it opens counts as absent. Each listed tag weighs
    the same (a tag listed twice counts twice).

    >>> xml_tags_present(completion="<think>a</think><answer>b</answer>")
    1.0
    >>> xml_tags_present(completion="<think>a</think><think>b</think><answer>c</answer>")
    0.5
    >>> xml_tags_present(completion="</answer>x<answer>", tags=["answer"])
    0.0
    >>> xml_tags_present(completion="<a>1</a> <b>2 <c>3</c>", tags=["a", "<b>", "c", "d"])
    0.5
    """
    if isinstance(tags, str):
        tags = [tags]
    names = [_tag_name(tag, "xml_tags_present.tags") for tag in tags]
    if not names:
        raise ValueError("reward 'xml_tags_present' needs 'tags' (a non-empty list of tag names).")

    def present(name: str) -> bool:
        open_tag, close_tag = f"<{name}>", f"</{name}>"
        if completion.count(open_tag) != 1 or completion.count(close_tag) != 1:
            return False
        return completion.index(open_tag) < completion.index(close_tag)

    return sum(present(name) for name in names) / len(names)


@reward
def answer_tag_match(
    completion: str, answer: Any = None, ignore_case: bool = False, tag: str = "answer", **_: Any
) -> float:
    """1.0 when the content of `<answer>...</answer>`, stripped, equals the reference answer, stripped.

    With several answer blocks the last one counts; with none (or an unclosed one) the score is
    0.0. `ignore_case` compares case-insensitively; `tag` renames the tag.

    >>> answer_tag_match(completion="<answer>Paris</answer>", answer="paris")
    0.0
    >>> answer_tag_match(completion="<answer>Paris</answer>", answer="paris", ignore_case=True)
    1.0
    >>> answer_tag_match(completion="<answer>1</answer> no, <answer>2</answer>", answer=2)
    1.0
    >>> answer_tag_match(completion="the answer is 42", answer=42)
    0.0
    """
    expected = str(_require_answer("answer_tag_match", answer)).strip()
    content = tag_content(completion, _tag_name(tag, "answer_tag_match.tag"))
    if content is None:
        return 0.0
    got = content.strip()
    if ignore_case:
        expected, got = expected.casefold(), got.casefold()
    return 1.0 if got == expected else 0.0
