"""ClipTokenizer against transformers' CLIPTokenizer loaded from the same folder: the ids
diffusers' pipelines feed the text encoder, prompt by prompt.

Folders: modelkiln's tiny test tokenizer, and a realistic vocabulary (a byte-level BPE trained
here on the standard library's source, in CLIP's layout: bytes, word-final bytes, merges, the
two special tokens) saved by transformers 5 (tokenizer.json) and laid out as the Hub's SD-1.5,
SD-2 and SDXL tokenizer_2 folders are (vocab.json + merges.txt, transformers 4 configs): both
pad conventions, <|endoftext|> (SD-1) and "!" (SD-2, SDXL's second encoder).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln.diffusion.tokenizer import ClipTokenizer
from modelkiln.errors import ArtifactError
from modelkiln.testing import _byte_level_alphabet, write_tiny_clip_tokenizer

pytestmark = pytest.mark.torch
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    # transformers 4's CLIPTokenizer is the Python one (without ftfy it splits CJK characters
    # apart and drops control characters); 5's is built on tokenizers, as ClipTokenizer is.
    pytest.skip("the reference is transformers 5's CLIPTokenizer", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LONG = ", ".join(f"highly detailed photo {i} of a red cat on a blue sofa" for i in range(12))
PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, UPPER and MiXeD case",
    "wow!!! what?! ... --- *** (parens) [brackets] {braces} #hash @at $5 100%",
    "1024x768, 3.14, 2024-01-31, v1.5, 8k uhd",
    "don't stop, it's fine, we're here, I've, I'm, you'll, he'd; DON'T IT'S",
    "café crème brûlée, straße, naïve Ångström, Ελληνικά, русский",
    "日本語のテキスト 東京 猫 한국어 中文",
    "a cat 🐱 and a dog 🐶 👍🏽 ❤️",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n and   multiple    spaces \u00a0nbsp\u3000ideographic",
    "",
    " ",
    "e\u0301 composed by NFC, ﬁ ligature, ＦＵＬＬ width",
    "<|startoftext|> special tokens in text <|endoftext|> twice<|endoftext|>",
    "<|ENDOFTEXT|> and <|StartOfText|> in capitals",
    "cat!dog! !",
    "\x00 control \x07 chars \u200b zero width",
    LONG,
    " ".join(["word"] * 80),
]
# The Hub's folders, saved by transformers 4 (modelled on runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0): special tokens as AddedToken objects, some of
# them normalized (matched on the lower-cased text).
SD15_TOKEN = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def sd15_files(vocab: dict[str, int]) -> dict[str, Any]:
    """SD-1.5's tokenizer_config.json and special_tokens_map.json (pad <|endoftext|>)."""
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", "content": BOS, **SD15_TOKEN},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", "content": EOS, **SD15_TOKEN},
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": EOS,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", "content": EOS, **SD15_TOKEN},
    }
    special = {
        "bos_token": {"content": BOS, **SD15_TOKEN},
        "eos_token": {"content": EOS, **SD15_TOKEN},
        "pad_token": EOS,
        "unk_token": {"content": EOS, **SD15_TOKEN},
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def sd2_files(vocab: dict[str, int]) -> dict[str, Any]:
    """SD-2.x pads with the "!" of its special_tokens_map.json (diffusers#2201); here the
    config says <|endoftext|>, and the map wins, as in transformers."""
    files = sd15_files(vocab)
    files["special_tokens_map.json"]["pad_token"] = "!"
    return files


def sdxl2_files(vocab: dict[str, int]) -> dict[str, Any]:
    """SDXL tokenizer_2's files (pad "!", an added_tokens_decoder with mixed flags)."""

    def entry(content: str, normalized: bool) -> dict[str, Any]:
        flags = {"lstrip": False, "normalized": normalized, "rstrip": False}
        return {"content": content, **flags, "single_word": False, "special": True}

    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab["!"]): entry("!", False),
            str(vocab[BOS]): entry(BOS, True),
            str(vocab[EOS]): entry(EOS, False),
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {
        "bos_token": {"content": BOS, **SD15_TOKEN},
        "eos_token": {"content": EOS, **SD15_TOKEN},
        "pad_token": "!",
        "unk_token": {"content": EOS, **SD15_TOKEN},
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def train_vocabulary(folder: Path) -> dict[str, int]:
    """vocab.json + merges.txt of a CLIP-like BPE trained on the standard library's source
    (and on the test prompts, so that some of their words are single tokens, as in CLIP)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    trainer_model = Tokenizer(BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    trainer_model.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=6000,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    corpus = [path.read_text(encoding="utf-8", errors="replace") for path in sources]
    trainer_model.train_from_iterator(corpus + PROMPTS * 3, trainer)
    merges = [tuple(m) for m in json.loads(trainer_model.to_str())["model"]["merges"]]
    alphabet = _byte_level_alphabet()
    merged = (a + b for a, b in merges)
    tokens = [*dict.fromkeys([*alphabet, *(c + "</w>" for c in alphabet), *merged]), BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    made = {
        "tiny-sd1": write_tiny_clip_tokenizer(root / "tiny-sd1"),
        "tiny-sd2": write_tiny_clip_tokenizer(root / "tiny-sd2", pad_token="!"),
        "tiny-short": write_tiny_clip_tokenizer(root / "tiny-short", model_max_length=8),
    }
    vocab = train_vocabulary(root / "bpe")
    made["bpe"] = root / "bpe"
    for name, pad in (("v5-sd1", EOS), ("v5-sd2", "!")):
        files = (str(root / "bpe" / "vocab.json"), str(root / "bpe" / "merges.txt"))
        reference = transformers.CLIPTokenizer(*files, pad_token=pad, model_max_length=77)
        reference.save_pretrained(root / name)
        made[name] = root / name
    layouts = {"hub-sd15": sd15_files, "hub-sd2": sd2_files, "hub-sdxl-2": sdxl2_files}
    for name, layout in layouts.items():
        folder = root / name
        folder.mkdir()
        for file in ("vocab.json", "merges.txt"):
            (folder / file).write_bytes((root / "bpe" / file).read_bytes())
        for file, content in layout(vocab).items():
            (folder / file).write_text(json.dumps(content, indent=2), encoding="utf-8")
        made[name] = folder
    return made


def references() -> list[Callable[[Path], Any]]:
    """CLIPTokenizer, and CLIPTokenizerFast should it become another class again."""
    classes = dict.fromkeys([transformers.CLIPTokenizer, transformers.CLIPTokenizerFast])
    return [cls.from_pretrained for cls in classes]


def expected(reference: Any, prompts: list[str]) -> np.ndarray:
    """What diffusers' StableDiffusion(XL)Pipeline.encode_prompt asks of its tokenizer."""
    return reference(
        prompts,
        padding="max_length",
        max_length=reference.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids


FOLDERS = [
    "tiny-sd1",
    "tiny-sd2",
    "tiny-short",
    "v5-sd1",
    "v5-sd2",
    "hub-sd15",
    "hub-sd2",
    "hub-sdxl-2",
]


@pytest.mark.parametrize("name", FOLDERS)
def test_ids_match_transformers(folders: dict[str, Path], name: str) -> None:
    ours = ClipTokenizer.from_folder(folders[name])
    got = ours(PROMPTS)
    for load in references():
        reference = load(folders[name])
        assert ours.model_max_length == reference.model_max_length
        want = expected(reference, PROMPTS)
        assert got.dtype == np.int64 and got.shape == want.shape
        for prompt, row, reference_row in zip(PROMPTS, got, want, strict=True):
            assert row.tolist() == reference_row.tolist(), prompt


def random_prompts(count: int) -> list[str]:
    """Prompts drawn from pieces that stress the normalizer, the word split and the added
    tokens: scripts, combining marks, odd whitespace, digits, "!" runs, special-token text."""
    pieces = [
        *"abcXYZ019!?.,'-_<|>\t\n \u00a0\u2003\u200béßÅø日本語🐱👍🏽\u0301ﬁＡ",
        "'s",
        "'T",
        "'ll",
        "<|endoftext|>",
        "<|startoftext|>",
        "<|EndOfText|>",
        " the ",
        " photo",
        "Cat",
        "!!!",
        "...",
        "1024x768",
        "\r\n",
        "  ",
    ]
    draw = random.Random(0)
    return ["".join(draw.choices(pieces, k=draw.randrange(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("name", ["tiny-sd2", "v5-sd2", "hub-sd15", "hub-sd2", "hub-sdxl-2"])
def test_random_prompts_match_transformers(folders: dict[str, Path], name: str) -> None:
    prompts = random_prompts(150)
    got = ClipTokenizer.from_folder(folders[name])(prompts)
    want = expected(transformers.CLIPTokenizer.from_pretrained(folders[name]), prompts)
    for prompt, row, reference_row in zip(prompts, got, want, strict=True):
        assert row.tolist() == reference_row.tolist(), prompt


@pytest.mark.parametrize("name", FOLDERS)
def test_count_matches_untruncated_transformers(folders: dict[str, Path], name: str) -> None:
    ours = ClipTokenizer.from_folder(folders[name])
    reference = transformers.CLIPTokenizer.from_pretrained(folders[name])
    for prompt in PROMPTS:
        assert ours.count(prompt) == len(reference(prompt, truncation=False).input_ids), prompt


def test_pad_conventions_and_truncation(folders: dict[str, Path]) -> None:
    vocab = json.loads((folders["bpe"] / "vocab.json").read_text(encoding="utf-8"))
    pads = {"v5-sd1": EOS, "v5-sd2": "!", "hub-sd15": EOS, "hub-sd2": "!", "hub-sdxl-2": "!"}
    for name, pad in pads.items():
        ours = ClipTokenizer.from_folder(folders[name])
        short, long = ours(["a cat", LONG])
        assert short[0] == vocab[BOS] and (short[-70:] == vocab[pad]).all(), name
        # Cut to 77 tokens: bos, the first 75 of the prompt's, eos.
        assert ours.count(LONG) > 77
        assert long[0] == vocab[BOS] and long[-1] == vocab[EOS] and long.shape == (77,)
    assert ClipTokenizer.from_folder(folders["v5-sd2"]).pad_token_id == 0


def test_a_batch_is_its_prompts_one_by_one(folders: dict[str, Path]) -> None:
    ours = ClipTokenizer.from_folder(folders["v5-sd2"])
    batch = ours(PROMPTS[:6])
    assert batch.shape == (6, 77)
    for prompt, row in zip(PROMPTS[:6], batch, strict=True):
        assert (ours([prompt])[0] == row).all()
    assert ours([]).shape == (0, 77)
    with pytest.raises(TypeError, match=r"pass \[prompt\]"):
        ours("a cat")


def test_model_max_length_without_a_limit_is_clips(tmp_path: Path) -> None:
    folder = write_tiny_clip_tokenizer(tmp_path / "t")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for value in (None, int(1e30)):
        config["model_max_length"] = value
        config_path.write_text(json.dumps(config))
        assert ClipTokenizer.from_folder(folder).model_max_length == 77


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    def fails(folder: Path, message: str) -> None:
        with pytest.raises(ArtifactError, match=message) as caught:
            ClipTokenizer.from_folder(folder)
        assert "\n" not in str(caught.value) and str(caught.value).endswith("rebuild the artifact")

    fails(tmp_path / "absent", r"absent is not a folder")
    folder = write_tiny_clip_tokenizer(tmp_path / "t")
    (folder / "tokenizer.json").unlink()
    (folder / "merges.txt").unlink()
    fails(folder, r"t has no tokenizer.json and no merges.txt")
    (folder / "merges.txt").write_text("#version: 0.2\nnot-in-vocab x\n")
    fails(folder, r"merges.txt is malformed")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "merges": []}}')
    fails(folder, r"tokenizer.json is malformed \(its model has no vocab object\)")
    (folder / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    fails(folder, r"tokenizer.json does not hold a BPE model")
    (folder / "tokenizer_config.json").write_text("{")
    fails(folder, r"tokenizer_config.json is not valid JSON")
    (folder / "tokenizer_config.json").unlink()
    fails(folder, r"cannot read .*tokenizer_config.json")


def test_importing_and_tokenizing_loads_neither_torch_nor_transformers(
    folders: dict[str, Path],
) -> None:
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from modelkiln.diffusion.tokenizer import ClipTokenizer\n"
        f"ids = ClipTokenizer.from_folder(Path({str(folders['v5-sd2'])!r}))(['a cat'])\n"
        "heavy = {'torch', 'transformers', 'huggingface_hub', 'diffusers'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modelkiln.testing import _tiny_t5_tokenizer

    folder = tmp_path_factory.mktemp("t5") / "tokenizer_3"
    _tiny_t5_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("length", [8, 256, 512])
def test_t5_tokenizer_matches_transformers(t5_folder: Path, length: int) -> None:
    """SD3's and Flux's T5 ids: padding="max_length", truncation, the closing eos."""
    from modelkiln.diffusion.tokenizer import T5Tokenizer

    reference = transformers.AutoTokenizer.from_pretrained(t5_folder)
    ours = T5Tokenizer.from_folder(t5_folder)
    expected = reference(PROMPTS, padding="max_length", max_length=length, truncation=True)
    np.testing.assert_array_equal(ours(PROMPTS, length), np.asarray(expected.input_ids))
    assert ours.count(LONG) == len(reference(LONG).input_ids)


def test_t5_tokenizer_needs_its_tokenizer_json(t5_folder: Path, tmp_path: Path) -> None:
    from modelkiln.diffusion.tokenizer import T5Tokenizer

    (tmp_path / "tokenizer_config.json").write_bytes(
        (t5_folder / "tokenizer_config.json").read_bytes()
    )
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is missing: the T5 tokenizer"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"is not a tokenizer\.json"):
        T5Tokenizer.from_folder(tmp_path)
