"""Rebuild tiny/qwen3vl/tokenizer.json, the tiny-random VLM's tokenizer (run from the repository
root: `python tiny/build_tokenizer.py`; it needs only the `tokenizers` library, no network).

A byte-level BPE trained on the templates in prompts/, without splitting at spaces and as large as
that text allows (about 3,600 tokens): a fixed paragraph of a template becomes one token, so a
template costs a tiny model a few dozen positions instead of a few thousand. That is what lets a
CPU train the toy student of "Watch PARROT work" on what varies (the request, the images, the
answer); any other text still tokenizes, byte by byte at worst. The Qwen special tokens come first,
with the ids tiny/qwen3vl/config.json names; the config's vocab_size is rounded up to 64. After
a rebuild, bump common.TINY_VERSION: models cached under the old version have the old vocabulary."""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]  # ids 0-6


def main() -> None:
    texts = [p.read_text() for p in sorted((ROOT / "prompts").glob("*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = ROOT / "tiny" / "qwen3vl"
    (folder / "tokenizer.json").write_text(tok.to_str())
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = -(-tok.get_vocab_size() // 64) * 64
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{tok.get_vocab_size()} tokens; vocab_size {config['text_config']['vocab_size']}")


if __name__ == "__main__":
    main()
