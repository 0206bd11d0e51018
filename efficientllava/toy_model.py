"""The toy LLaVA's architecture, tokenizer and image processor, built from plain Hugging Face classes.

A CLIP vision tower, LLaVA's two-layer MLP projector and a Llama decoder (grouped-query attention, SwiGLU MLP), all
`transformers` classes, so the toy travels through exactly the code that loads llava-hf/llava-1.5-7b-hf.
"""
from __future__ import annotations

from dataclasses import dataclass

from efficientllava.data.prompts import INSTRUCTIONS, LETTERS
from efficientllava.data.scenes import COLOURS, IMAGE_SIZE, CELL, PLURALS, SHAPES
from efficientllava.data.toy_benchmark import HINTS, QUADRANTS, RELATIONS

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = range(len(SPECIAL_TOKENS))


@dataclass
class ToyArchitecture:
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 256
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    image_layout: str = "before_text"  # where the chat template puts the image: IMAGE_LAYOUTS


def toy_corpus() -> list[str]:
    """Every sentence the toy benchmark and its prompts can produce, word for word."""
    text = ["USER: <image>", "ASSISTANT:", "Context:", *INSTRUCTIONS.values(), *HINTS.values()]
    text += [f"{letter}." for letter in LETTERS]
    text += [str(i) for i in range(19)] + list(QUADRANTS) + ["yes no", "What digit is shown?"]
    text += ["What is the sum of the two digits?", "empty , digit"]
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for colour in COLOURS:
        text += [f"What shape is the {colour} object?", f"How many {colour} objects are there?"]
    for shape in SHAPES:
        text += [f"What color is the {shape}?", f"How many {PLURALS[shape]} are there?", shape]
    for name in names:
        text += [f"Where is the {name}?"]
        text += [f"How many objects are {r} the {name}?" for r in RELATIONS]
        text += [f"Is the {name} {r} the" for r in RELATIONS]
        text += [f"What is directly {r} the {name}?" for r in RELATIONS]
    return text


def build_tokenizer():
    """A word-level tokenizer over the toy corpus (tokenizers library), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for line in toy_corpus() for w, _ in pre.pre_tokenize_str(line)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


# Where the toy's chat template puts the image. `before_text` (the shipped toy's): LLaVA-1.5's own layout
# (USER: <image>\n...), where every option token sees the image and can judge itself, which the option-flag target
# (toy_training.option_flag_loss) needs. `after_text` (the toys before it): image tokens can attend to the question,
# and the lettered options cannot see the image.
_USER_TEXT = "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
_USER_IMAGE = "{% for c in message['content'] %}{% if c['type'] == 'image' %} <image>{% endif %}{% endfor %}"
_TURNS = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER:{user}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
IMAGE_LAYOUTS = {
    "after_text": _TURNS.replace("{user}", " " + _USER_TEXT + _USER_IMAGE),
    "before_text": _TURNS.replace("{user}", _USER_IMAGE + " " + _USER_TEXT),
}


def chat_template(image_layout: str) -> str:
    if image_layout not in IMAGE_LAYOUTS:
        raise ValueError(f"image_layout={image_layout!r} is unknown; expected one of {list(IMAGE_LAYOUTS)}")
    return IMAGE_LAYOUTS[image_layout]


def build_processor(image_layout: str = "before_text"):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.2, 0.2, 0.2],
        image_std=[0.3, 0.3, 0.3],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template(image_layout),
    )


def text_config(arch: ToyArchitecture, vocab_size: int):
    """The toy's Llama decoder configuration."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def build_toy_llava(arch: ToyArchitecture | None = None, seed: int = 0, attn_implementation: str | None = None):
    """A freshly initialised toy LLaVA and its processor. `attn_implementation` (transformers' names: 'eager',
    'sdpa', ...) sets the attention kernels of every sub-model; None keeps transformers' default. It is not saved
    with the model: a saved toy loads with the loader's choice (conf/model: attn_implementation)."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    arch = arch or ToyArchitecture()
    processor = build_processor(arch.image_layout)
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
        projection_dim=arch.vision_hidden,
    )
    text = text_config(arch, len(processor.tokenizer))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        image_seq_length=(IMAGE_SIZE // CELL) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if attn_implementation is not None:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as error:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not available for the toy LLaVA: "
                             f"{error}") from None
    return model, processor
