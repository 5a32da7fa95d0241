"""Tiny vision-language models built offline from transformers' own config classes: what the tests,
the demo and the benchmarks train. Each is saved with `save_pretrained`, so that it loads
(seqforget.models.load_model) through the same path a 7B checkpoint takes."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from seqforget.models import load_model, quiet_transformers

# LLaVA-1.5's conversation format, as a chat template over multimodal messages.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]  # what its processor frames images with



@dataclass
class TinySpec:
    """Sizes of the tiny LLaVA (about 0.8M parameters at these defaults)."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    max_positions: int = 256
    seed: int = 0


def _fast(tok):
    """A `tokenizers.Tokenizer` as the HF fast tokenizer LLaVA's processor expects, with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_word_tokenizer(texts: list[str], special: tuple[str, ...] = ()):
    """A word-level tokenizer over `texts` (whitespace and punctuation split), as a fast HF tokenizer;
    `special`: tokens beyond SPECIAL_TOKENS that an architecture's processor uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    pre = pre_tokenizers.Whitespace()
    specials = SPECIAL_TOKENS + list(special)
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} | {"USER", "ASSISTANT", ":"})
    words = [w for w in words if w not in specials]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(list(special))  # whole, never split by the pre-tokenizer
    return _fast(tok)


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 500):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`, as a fast HF tokenizer.

    Every byte is in the vocabulary, so no text is unknown. On a small world's text, 500
    entries make the frequent words of the questions one token each and split the rarer
    ones: names take about five tokens, a third of the answers two to five.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # " word" and "word" differ, as in GPT-2
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"USER: {t} ASSISTANT:" for t in texts], trainer)  # merges as the chat template frames them
    return _fast(tok)


def build_tiny_llava(out_dir: Path, texts: list[str], spec: TinySpec = TinySpec(), tokenizer=None):
    """Build a randomly initialised tiny LLaVA whose vocabulary covers `texts`, save it, load it back.

    CLIP vision config + Llama text config + a tokenizer (word-level over `texts` unless
    one is given) + CLIPImageProcessor, written with save_pretrained. Returns (model,
    processor) as `load_model` gives them.
    """
    quiet_transformers()
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(texts) if tokenizer is None else tokenizer
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vocab = tokenizer.get_vocab()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=2 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        ),
        text_config=LlamaConfig(
            hidden_size=spec.text_hidden,
            intermediate_size=2 * spec.text_hidden,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_heads,
            vocab_size=len(vocab),
            max_position_embeddings=spec.max_positions,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        ),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return load_model(out_dir)


def build_tiny_idefics3(out_dir: Path, texts: list[str], spec: TinySpec = TinySpec()):
    """A randomly initialised tiny Idefics3 (SmolVLM's architecture: a SigLIP vision encoder, a
    connector that shuffles 2 x 2 patches into one token and projects it, a Llama text model),
    saved with save_pretrained and loaded back as `load_model` gives it. Its image processor keeps
    each image whole (no splitting into crops): (spec.image_size / spec.patch_size)^2 / 4 image
    tokens per image."""
    quiet_transformers()
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(texts, tuple(IDEFICS3_TOKENS))
    side = {"longest_edge": spec.image_size}
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size=side, max_image_size=side)
    scale = 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAVA_CHAT_TEMPLATE,
                                  image_seq_len=(spec.image_size // spec.patch_size) ** 2 // scale**2)
    vocab = tokenizer.get_vocab()
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                           image_size=spec.image_size, patch_size=spec.patch_size).to_dict(),
        text_config=LlamaConfig(hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                                num_key_value_heads=spec.text_heads, vocab_size=len(vocab),
                                max_position_embeddings=spec.max_positions, pad_token_id=vocab["<pad>"],
                                bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]).to_dict(),
        scale_factor=scale, image_token_id=vocab["<image>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(spec.seed)
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return load_model(out_dir)
