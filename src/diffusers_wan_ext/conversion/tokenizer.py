"""The umT5 tokenizer: loading the release's ``google/umt5-xxl`` folder offline, and building a tiny stand-in.

Wan releases carry the tokenizer as a sub-folder ``google/umt5-xxl/`` (``spiece.model``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``).  :func:`load_umt5_tokenizer` reads it without touching the
network.  :func:`make_tiny_umt5_tokenizer` trains, in-process and fully offline, a tiny SentencePiece unigram model
with umT5's special-token layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS, EOS appended) and saves it in the same
folder layout, for tests and demos that build a tiny original-layout release.

Example:
    >>> tok = make_tiny_umt5_tokenizer("/tmp/tiny/google/umt5-xxl")  # doctest: +SKIP
    >>> tok(["a cat"], padding="max_length", max_length=16, truncation=True, return_attention_mask=True)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from ..utils import ConversionError

__all__ = ["TINY_CORPUS", "UMT5_SPECIAL_TOKENS", "load_umt5_tokenizer", "make_tiny_umt5_tokenizer"]

#: umT5 / T5 special-token layout: (id, piece).
UMT5_SPECIAL_TOKENS = ((0, "<pad>"), (1, "</s>"), (2, "<unk>"))

_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")

#: Built-in training text for the tiny tokenizer (video-prompt style English, plus digits and punctuation).
TINY_CORPUS = """
A cat sits on a red mat and looks at the camera. A small dog runs across a green park under a bright blue sky.
The quick brown fox jumps over the lazy dog. Two children play with a yellow ball near the river at sunset.
A woman in a white dress walks slowly along the beach while waves roll onto the sand.
An old man reads a newspaper on a wooden bench in a quiet city square, pigeons around his feet.
Cinematic shot of a futuristic city at night, neon lights reflecting on wet streets, flying cars overhead.
A close-up of a hummingbird drinking nectar from a pink flower, wings moving very fast, shallow depth of field.
Aerial view of snowy mountains and a frozen lake, soft morning light, clouds drifting over the peaks.
A chef chops fresh vegetables in a busy kitchen; steam rises from the pots and pans on the stove.
The astronaut floats inside the space station and waves at the earth through a round window.
Heavy rain falls on an empty road in the forest, the camera slowly moves forward between tall trees.
A golden retriever puppy chases butterflies in a field of sunflowers during a warm summer afternoon.
Time-lapse of clouds moving over a desert canyon, shadows changing as the sun goes down.
A violinist plays on a stage with dramatic lighting and smoke, the audience claps in the dark.
Underwater footage of colorful fish swimming around a coral reef, sunlight beams through the water.
A red sports car drives fast along a winding coastal road, ocean cliffs on the left side.
Macro photo of dew drops on a spider web at dawn, each drop reflecting the rising sun.
A panda eats bamboo while sitting in the grass, then rolls over and looks up at the trees.
High quality, best quality, detailed, realistic, 4k, 8k, HDR, masterpiece, smooth motion, stable camera.
Low quality, worst quality, blurry, static, overexposed, jpeg artifacts, deformed hands, extra fingers, watermark.
The train leaves the station in winter; snow covers the tracks and passengers wave from the windows.
An artist paints a portrait with oil colors in a bright studio full of canvases and brushes.
A horse gallops across the meadow with its mane flowing in the wind, mountains in the background.
Fireworks explode over the harbor at midnight, boats and buildings lit in red, green, gold and purple.
A robot assembles small parts on a factory line, sparks flying, metal arms moving with precision.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 10 24 100 2025 - + = / % & # @ ! ? ( ) [ ] " ' : ; , .
Autumn leaves fall in a quiet park; an old lamp post glows orange while people walk their dogs.
A boy rides a bicycle down a hill in the village, chickens scatter and a farmer laughs.
Slow motion of a glass of milk spilling onto a black table, droplets splashing in every direction.
The camera pans from left to right across a medieval castle surrounded by fog and green hills.
A girl with curly hair smiles and turns her head toward the window as soft light enters the room.
Jellyfish glowing blue in the deep ocean, drifting gently in total darkness.
A family eats dinner together at a long table, candles, wine glasses, laughter and warm colors.
Lightning strikes over a wheat field during a summer storm, dark clouds swirling quickly.
A tiger walks through tall grass in the jungle, stops, and stares directly into the lens.
Zoom in on an ancient map with mountains, rivers, and a compass drawn in faded ink.
Quiet snowfall in a pine forest; a fox jumps into the snow to catch a mouse.
"""


def _umt5_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        nested = folder / "google" / "umt5-xxl"  # a Wan release folder holds the tokenizer in google/umt5-xxl/
        if any((nested / f).is_file() for f in _TOKENIZER_FILES):
            return nested
    return folder


def load_umt5_tokenizer(folder: str | os.PathLike):
    """Load the umT5 tokenizer of a ``google/umt5-xxl`` folder (or a Wan release folder containing one), offline.

    Needs ``tokenizer.json`` and / or ``spiece.model`` (``tokenizer_config.json`` recommended).  Raises
    :class:`ConversionError` when the folder does not exist, lacks both files, cannot be read, or does not have
    umT5's special ids (``<pad>`` 0, ``</s>`` 1).
    """
    from transformers import AutoTokenizer, T5Tokenizer

    path = _umt5_folder(folder)
    if not path.is_dir():
        raise ConversionError(f"{folder}: umT5 tokenizer folder not found")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ConversionError(
            f"{path}: not a umT5 tokenizer folder: needs {' or '.join(_TOKENIZER_FILES)} "
            f"(+ tokenizer_config.json), found {present}. Point to the release's google/umt5-xxl/ folder."
        )
    try:
        if (path / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:  # bare spiece.model / tokenizer.json: the file defines the whole vocabulary, no extra sentinels
            tok = T5Tokenizer.from_pretrained(str(path), local_files_only=True, extra_ids=0)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for broken folders
        raise ConversionError(f"{path}: cannot load the umT5 tokenizer ({type(e).__name__}: {e})") from e
    if tok.pad_token_id != 0 or tok.eos_token_id != 1:
        raise ConversionError(
            f"{path}: not a umT5 tokenizer: pad id {tok.pad_token_id} / eos id {tok.eos_token_id} (umT5 uses 0 / 1)"
        )
    return tok


def _drop_load_time_fields(config_path: Path) -> None:
    """transformers 5 writes the load-time flags ``is_local`` / ``local_files_only`` into the saved config; drop them."""
    cfg = json.loads(config_path.read_text())
    if any(k in cfg for k in ("is_local", "local_files_only")):
        for k in ("is_local", "local_files_only"):
            cfg.pop(k, None)
        config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def make_tiny_umt5_tokenizer(
    save_dir: str | os.PathLike, vocab_size: int = 256, corpus: str | None = None
):
    """Train a tiny umT5-style SentencePiece unigram tokenizer offline and save it to ``save_dir``; return it.

    The folder has the ``google/umt5-xxl`` layout (``spiece.model``, ``tokenizer.json``, ``tokenizer_config.json``,
    class ``T5Tokenizer``) and loads with ``AutoTokenizer.from_pretrained(save_dir)``.  Ids: ``<pad>`` 0, ``</s>`` 1
    (appended by ``add_special_tokens=True``), ``<unk>`` 2; no BOS, no ``<extra_id_*>`` sentinels, so every id is
    ``< len(tokenizer) == vocab_size`` and fits a text encoder with that vocabulary.  Training uses
    :data:`TINY_CORPUS` (or ``corpus``) single-threaded, so the result is deterministic.  ``vocab_size`` must be
    reachable from the corpus (the built-in text supports up to about 400 pieces).
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    text = TINY_CORPUS if corpus is None else corpus
    sentences = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            model_type="unigram",
            vocab_size=int(vocab_size),
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            character_coverage=1.0,
            byte_fallback=False,
            normalization_rule_name="nmt_nfkc",
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConversionError(f"cannot train a {vocab_size}-piece tokenizer on the given text: {e}") from e
    (save_dir / "spiece.model").write_bytes(buf.getvalue())
    tok = T5Tokenizer.from_pretrained(str(save_dir), local_files_only=True, extra_ids=0)
    tok.save_pretrained(str(save_dir))
    _drop_load_time_fields(save_dir / "tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(save_dir), local_files_only=True)
    got = {i: tok.convert_ids_to_tokens(i) for i, _ in UMT5_SPECIAL_TOKENS}
    if got != dict(UMT5_SPECIAL_TOKENS) or len(tok) != vocab_size:
        raise ConversionError(f"{save_dir}: tiny tokenizer came out wrong: special ids {got}, {len(tok)} tokens")
    return tok
