"""DSVL's prompt template (utils/data/DST.py as chat/chat.py uses it), torch-free.

The reference builds each round as: the system instruction (first round only), then for k new
images ``### Image:\\n<image>\\n`` k times and a blank line, then
``### Question:\\n{question}\\n\\n### Answer:\\n``; each ``### Image:`` is then renamed
``### Image n:``, n counting images across the whole conversation (at most 8).
"""

from __future__ import annotations

from runtime.errors import UserError

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.\n\n"
)
IMAGE_PRETOKEN = "### Image:"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"
QUESTION_PRETOKEN = "### Question:"
ANSWER_PRETOKEN = "### Answer:"
MAX_IMAGES = 8  # DSVL numbers at most 8 images per conversation

# The tokens DSVL adds to LLaMA's tokenizer, in the order that fixes their ids (V, V+1, V+2).
DSVL_SPECIAL_TOKENS = (IMAGE_PRETOKEN, IMAGE_TOKEN)


class PromptError(UserError):
    """A conversation the DSVL template cannot express (too many images...)."""


def image_label(number: int) -> str:
    """DSVL's name for the conversation's ``number``-th image (DST.IMAGE_NUM_n)."""
    return f"### Image {number}:"


def format_round(question: str, num_new_images: int, images_before: int = 0,
                 first_round: bool = True) -> str:
    """One user round in DSVL's template; ``images_before`` counts earlier rounds' images."""
    return "".join(round_parts(question, num_new_images, images_before, first_round))


def round_parts(question: str, num_new_images: int, images_before: int = 0,
                first_round: bool = True, number_images: bool = True) -> tuple[str, str]:
    """The round as (template head, tail): the head holds the system instruction and the image
    lines and ends with the last ``<image>`` (empty without images); the tail is the rest, the
    only part with user text. Tokenizers split at added tokens, so the two can be tokenized
    apart (runtime/tokenizer.py) and user text can never turn into an image slot. Without
    ``number_images`` the image lines keep DSVL's special ``### Image:`` token (eval/
    batch_generation.py numbers them after tokenizing)."""
    if num_new_images < 0:
        raise PromptError("the number of images cannot be negative")
    if images_before + num_new_images > MAX_IMAGES:
        raise PromptError(f"DSVL's template numbers at most {MAX_IMAGES} images per conversation; "
                          f"got {images_before + num_new_images}")
    head = f"{IMAGE_PRETOKEN}\n{IMAGE_TOKEN}\n" * num_new_images
    tail = f"{QUESTION_PRETOKEN}\n{question}\n\n{ANSWER_PRETOKEN}\n"
    if num_new_images:
        head, tail = head[:-1], "\n\n" + tail  # split right after the last <image>
    if first_round:
        head, tail = (SYSTEM_PROMPT + head, tail) if num_new_images else ("", SYSTEM_PROMPT + tail)
    if number_images:
        for number in range(images_before + 1, images_before + num_new_images + 1):
            head = head.replace(IMAGE_PRETOKEN, image_label(number), 1)
    return head, tail
