"""LLaVA-1.5's published shapes with random weights: the 7B/13B benchmarks' models, built without any download.

The values are those of llava-hf/llava-1.5-{7b,13b}-hf's configs: CLIP ViT-L/14 at 336 px (576 image tokens, the
second-to-last layer's features), LLaVA's 2-layer GELU projector, Vicuna's Llama decoder with a 32,064-token
vocabulary. `scaled-down` keeps the image size, token counts and vocabulary and shrinks widths and depths, so a CPU
runs the same code path in seconds. A tokenizer changes no shape: the processor pairs LLaVA-1.5's image processing
and prompt layout with the toy's word-level tokenizer.
"""
from __future__ import annotations

import torch

VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768, layer_norm_eps=1e-5, hidden_act="quick_gelu")
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "scaled-down": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4),
}
SCALED_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=64)
TEXT = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu")
IMAGE_MEAN, IMAGE_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CHAT_TEMPLATE = (  # LLaVA-1.5's layout: "USER: <image>\n<text> ASSISTANT:"
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def check_shape(shape: str) -> str:
    if shape not in SHAPES:
        raise ValueError(f"LLaVA-1.5 shape {shape!r} is unknown; expected one of {sorted(SHAPES)}")
    return shape


def llava15_config(shape: str = "7b"):
    """A LlavaConfig with LLaVA-1.5's values for `shape` (7b, 13b, or scaled-down widths and depths)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from efficientllava.toy_model import BOS, EOS, IMAGE, PAD

    vision = {**VISION, **(SCALED_VISION if check_shape(shape) == "scaled-down" else {})}
    text = LlamaConfig(**TEXT, **SHAPES[shape], pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    grid = vision["image_size"] // vision["patch_size"]
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_index=IMAGE,
                       image_seq_length=grid * grid, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def llava15_processor():
    """LLaVA-1.5's image processing (336 px, CLIP statistics) and prompt layout around the toy's tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from efficientllava.toy_model import build_tokenizer

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": VISION["image_size"]},
                                            crop_size={"height": VISION["image_size"], "width": VISION["image_size"]},
                                            image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                          patch_size=VISION["patch_size"], vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def random_llava(shape: str = "7b", device="cpu", dtype=torch.float16, seed: int = 0):
    """A LlavaForConditionalGeneration of `shape` with random weights, built directly on `device`, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    config = llava15_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def random_batch(model, rows: int, text_tokens: int = 64, seed: int = 0) -> dict:
    """Model inputs in LLaVA-1.5's layout (8 text tokens, the image's tokens, the rest of the text), random ids and
    pixels, on the model's device: what prefill and calibration cost depends on, not what the tokens say."""
    config = model.config
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(100, min(30000, config.text_config.vocab_size), (rows, text_tokens), generator=gen)
    ids = torch.cat([text[:, :8], torch.full((rows, n_image), config.image_token_index), text[:, 8:]], dim=1)
    device, dtype = model.device, model.dtype
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(rows, 3, vision.image_size, vision.image_size, generator=gen).to(device, dtype)}
