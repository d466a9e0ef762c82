"""The Wan2.2-S2V family (speech-to-video): audio-driven DiT with a wav2vec2 audio encoder.

The S2V DiT is a 16-channel Wan DiT without CLIP plus its audio modules (``casual_audio_encoder``, per-layer
``audio_injector``), FramePack motion frames (``frame_packer``), pose conditioning (``cond_encoder``) and a trainable
reference mask; :class:`~diffusers_wan_ext.WanS2VTransformer3DModel` holds it.  The release's
``wav2vec2-large-xlsr-53-english/`` folder becomes the ``audio_encoder`` / ``audio_processor`` components.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..conversion.audio_encoder import WAV2VEC_DIR, load_audio_encoder_from_release, load_audio_processor_from_release
from ..conversion.dit import DitExtension, DitInfo, DitShape, block_indices
from ..models import WanS2VTransformer3DModel
from ..models.transformer_wan_s2v import RELEASE_AUDIO_INJECT_LAYERS, WanS2VTransformerBlock, audio_injector_layout
from ..pipelines import WanSpeechToVideoPipeline
from ..pipelines.s2v_conditioning import audio_embeds_per_clip, motion_history, pose_latents_per_clip
from ..utils.io import ConversionError, format_keys
from .base import Conditioning, ConvertInput, ExtraInput, GenerateInput, ModelFamily, TinyArch, WanVariant

__all__ = ["S2V_RELEASE_OPTIONS", "SpeechToVideoFamily", "encode_s2v_condition", "make_tiny_wav2vec"]

# Inside ``audio_injector.injector.N.`` (audio cross-attention; stock ``WanAttention`` names).
AUDIO_INJECTOR_KEY_MAP = (
    ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"),
)
# Key families of the S2V DiT (names of the Diffusers S2V port).
S2V_TOP_LEVEL_KEYS = (
    ("cond_encoder", "condition_embedder.pose_embedder"),
    ("casual_audio_encoder", "condition_embedder.causal_audio_encoder"),
    ("trainable_cond_mask", "trainable_condition_mask"),
    ("frame_packer", "frame_packer"),
    ("audio_injector.injector_adain_layers", "audio_injector.injector_adain_layers"),
)
S2V_KEY_PREFIXES = ("casual_audio_encoder.", "audio_injector.", "frame_packer.", "cond_encoder.", "trainable_cond_mask.")
#: S2V options of the release config.json and the values of the release (used when config.json lacks them).
S2V_RELEASE_OPTIONS = dict(motion_frames=73, zero_timestep=True, add_last_motion=True, framepack_drop_mode="padd")
_REQUIRED = ("casual_audio_encoder.weights", "casual_audio_encoder.encoder.conv1_local.conv.weight",
             "frame_packer.proj.weight", "trainable_cond_mask.weight", "audio_injector.injector.0.q.weight")
_RELEASE_SETTINGS = (("enable_motioner", False), ("enable_framepack", True), ("adain_mode", "attn_norm"),
                     ("enable_tsm", False))


def _check_release_settings(sd, cfg) -> None:
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ConversionError(
            f"incomplete Wan2.2-S2V DiT: missing key(s) {format_keys(missing)} (only the released S2V layout with "
            "FramePack motion frames is supported)"
        )
    unsupported = [f"{k}={cfg[k]!r}" for k, ok in _RELEASE_SETTINGS if k in cfg and cfg[k] != ok]
    if unsupported:
        raise ConversionError(
            f"config.json has {', '.join(unsupported)}: only the released S2V configuration (FramePack motion frames, "
            "AdaLN 'attn_norm' audio injection, no motioner transformer) is supported"
        )


def _audio_widths(sd, cfg, dim: int) -> dict[str, Any]:
    layers_w = sd["casual_audio_encoder.weights"]
    conv1 = sd["casual_audio_encoder.encoder.conv1_local.conv.weight"]
    quarter = dim // 4
    if layers_w.ndim != 4 or conv1.ndim != 3 or conv1.shape[0] % quarter:
        raise ConversionError(
            f"casual_audio_encoder: weights {tuple(layers_w.shape)} / encoder.conv1_local.conv.weight "
            f"{tuple(conv1.shape)} do not fit a {dim}-wide S2V DiT (expected [1, layers, 1, 1] and "
            f"[{quarter} * tokens, audio_dim, 3])"
        )
    enable_adain = "casual_audio_encoder.encoder.conv1_global.conv.weight" in sd
    has_adain_layers = "audio_injector.injector_adain_layers.0.linear.weight" in sd
    if has_adain_layers != enable_adain or ("enable_adain" in cfg and bool(cfg["enable_adain"]) != enable_adain):
        raise ConversionError(
            f"inconsistent AdaLN audio injection: casual_audio_encoder.encoder.conv1_global "
            f"{'present' if enable_adain else 'absent'}, audio_injector.injector_adain_layers "
            f"{'present' if has_adain_layers else 'absent'}, config enable_adain={cfg.get('enable_adain', '(unset)')}"
        )
    return dict(audio_dim=int(conv1.shape[1]), audio_num_layers=int(layers_w.shape[1]),
                num_audio_tokens=int(conv1.shape[0]) // quarter, enable_adain=enable_adain)


def _inject_layers(sd, cfg, num_layers: int) -> list[int]:
    injectors = block_indices(sd, "audio_injector.injector")
    if injectors != list(range(len(injectors))):
        raise ConversionError(f"audio injectors are not contiguous (found audio_injector.injector indices {injectors})")
    layers = [int(i) for i in cfg["audio_inject_layers"]] if "audio_inject_layers" in cfg else list(
        RELEASE_AUDIO_INJECT_LAYERS)
    count, _ = audio_injector_layout(num_layers, layers)
    if count != len(injectors):
        raise ConversionError(
            f"{len(injectors)} audio injectors (audio_injector.injector.*) but audio_inject_layers {layers} with "
            f"{num_layers} DiT blocks give {count}: give audio_inject_layers in config.json (the release lists "
            f"{list(RELEASE_AUDIO_INJECT_LAYERS)} for 40 blocks)"
        )
    return layers


def _config(shape: DitShape) -> dict[str, Any]:
    """Config entries of a Wan2.2-S2V DiT (``WanModel_S2V``), from the shapes and the release ``config.json``."""
    sd, cfg = shape.sd, shape.cfg
    if not any(k.startswith(S2V_KEY_PREFIXES) for k in sd):
        return {}
    _check_release_settings(sd, cfg)
    options = {k: cfg.get(k, v) for k, v in S2V_RELEASE_OPTIONS.items()}
    return dict(
        **_audio_widths(sd, cfg, shape.dim),
        audio_inject_layers=_inject_layers(sd, cfg, shape.num_layers),
        pose_dim=int(sd["cond_encoder.weight"].shape[1]) if "cond_encoder.weight" in sd else 0,
        motion_frames=int(options["motion_frames"]),
        zero_timestep=bool(options["zero_timestep"]),
        add_last_motion=bool(options["add_last_motion"]),
        framepack_drop_mode=str(options["framepack_drop_mode"]),
    )


def _detect(shape: DitShape, ext: dict[str, Any]) -> str | None:
    if "audio_inject_layers" not in ext:
        return None
    if shape.has_img or shape.extra_channels:
        raise ConversionError(
            f"Wan2.2-S2V weights (casual_audio_encoder.*) on a DiT with in_dim {shape.in_dim} / out_dim "
            f"{shape.out_dim} / img_emb {'present' if shape.has_img else 'absent'}: the S2V DiT takes 16 latent "
            "channels and no CLIP"
        )
    return "s2v"


def _model_class(info: DitInfo) -> type:
    return WanS2VTransformer3DModel


#: The tiny S2V DiT's original config options (release: motion_frames 73, 12 audio layers ...).  motion_frames is
#: tiny too: the history is VAE-encoded once per clip (the dit_s2v golden covers the release's 73 frames).
TINY_S2V_CONFIG = dict(
    enable_adain=True, adain_mode="attn_norm", audio_inject_layers=[0, 1], zero_init=True, zero_timestep=True,
    enable_motioner=False, add_last_motion=True, trainable_token=False, enable_tsm=False, enable_framepack=True,
    framepack_drop_mode="padd", motion_frames=9, cond_dim=16,
)
TINY_WAV2VEC = dict(hidden_size=32, num_hidden_layers=2)


def make_tiny_wav2vec(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``wav2vec2-large-xlsr-53-english`` folder as the S2V release ships it: ``Wav2Vec2ForCTC`` config,
    ``model.safetensors`` with the legacy ``weight_g`` / ``weight_v`` names of the positional conv, and the
    ``Wav2Vec2Processor`` files (feature extractor at 16 kHz + CTC vocabulary)."""
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(
        vocab_size=8, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer", mask_time_prob=0.05,
        architectures=["Wav2Vec2ForCTC"], **TINY_WAV2VEC,
    )
    model = Wav2Vec2ForCTC(cfg)
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"):
        v.contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(legacy, str(folder / "model.safetensors"))
    cfg.save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5, "B": 6, "C": 7}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    extractor.save_pretrained(folder)  # preprocessor_config.json, as the release (saved by transformers 4.x)
    tokenizer.save_pretrained(folder)
    return folder


#: Video frame rate the training audio is matched to (the release's, as DiffSynth-Studio's training).
TRAINING_FPS = 16


def encode_s2v_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Wan2.2-S2V training inputs, as DiffSynth-Studio's ``WanVideoUnit_S2V`` builds them for the first clip.

    The clip's first frame is the reference: its latent frame is the transformer's ``image_latents`` (from
    ``input_image``) and the target is the other ``(num_frames - 1) / 4`` latent frames; ``audio_embeds`` are the
    Wav2Vec2 features of ``input_audio`` for ``num_frames - 1`` frames at 16 fps (the pipeline's
    :func:`~diffusers_wan_ext.pipelines.s2v_conditioning.audio_embeds_per_clip`; the audio encoder is frozen), the
    pose latents those of ``s2v_pose_video``'s first ``num_frames - 1`` frames, and the motion history is empty
    (``drop_motion_frames``), as for the first clip of a video.
    """
    pipe = builder.pipe
    if num_frames < 5:
        raise ValueError(f"Wan2.2-S2V trains on clips of 4n+1 >= 5 frames (the first is the reference); this clip has "
                         f"{num_frames}")
    if pipe.audio_encoder is None or pipe.audio_processor is None:
        raise ValueError("Wan2.2-S2V training needs the audio_encoder and audio_processor of the model folder")
    if pipe.audio_sample_rate != 16000:
        raise ValueError(f"the audio processor expects {pipe.audio_sample_rate} Hz; input_audio is read at 16000 Hz")
    frames = num_frames - 1
    inputs.latents = inputs.latents[:, :, 1:]
    image = builder.image(sample, "input_image").to(builder.device)
    audio = sample["input_audio"].numpy()
    embeds = audio_embeds_per_clip(pipe.audio_encoder, pipe.audio_processor, audio, 16000, fps=TRAINING_FPS,
                                   frames_per_clip=frames, device=builder.device)[0]
    history = motion_history(None, pipe.transformer.config.motion_frames, height, width).to(builder.device)
    kwargs = {
        "audio_embeds": embeds,
        "image_latents": builder.encode_latents(image.unsqueeze(2)),
        "motion_latents": builder.encode_latents(history),
        "drop_motion_frames": torch.tensor(True),
    }
    if "s2v_pose_video" in builder.extra_inputs:
        pose = builder.video(sample, "s2v_pose_video").to(builder.device)
        kwargs["pose_latents"] = pose_latents_per_clip(pipe.vae, pose, 1, frames)[0]
    inputs.transformer_kwargs = kwargs


S2V_CONDITIONING = Conditioning("Wan2.2-S2V (speech-to-video)", WanSpeechToVideoPipeline,
                                required=("input_image", "input_audio"), optional=("s2v_pose_video",),
                                encode=encode_s2v_condition)


class SpeechToVideoFamily(ModelFamily):
    name = "s2v"
    title = "Wan2.2-S2V (speech-to-video)"
    variants = (
        WanVariant(
            "wan2.2-s2v-14b", "s2v", "Wan-AI/Wan2.2-S2V-14B", dim=5120, num_layers=40, audio_encoder=True,
            pipeline="WanSpeechToVideoPipeline", flow_shift=3.0, num_inference_steps=40, guidance_scale=4.5,
            height=448, width=832, num_frames=80, fps=16,
            notes="num_frames is per clip (4n); the pipeline generates as many clips as the audio spans",
        ),
    )
    dit = DitExtension(
        name="s2v", arches=("s2v",), layouts="S2V 16/16 + casual_audio_encoder.*",
        top_level_keys=S2V_TOP_LEVEL_KEYS, block_tables={"audio_injector.injector": AUDIO_INJECTOR_KEY_MAP},
        config=_config, detect=_detect, model_class=_model_class,
        drop_config_keys=("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"), priority=30,
        unit_dim_keys=((r"^casual_audio_encoder\.weights$", 4), (r"^casual_audio_encoder\..*padding_tokens$", 4)),
    )
    model_classes = (WanS2VTransformer3DModel,)
    pipeline_classes = (WanSpeechToVideoPipeline,)
    convert_inputs = (
        ConvertInput("--audio-encoder", "audio_encoder", "Wan2.2-S2V wav2vec2-large-xlsr-53-english folder (model + "
                     "processor)", kind="folder"),
    )
    generate_inputs = (
        GenerateInput("--audio", "audio", "Wan2.2-S2V: the speech audio file (wav / mp3 / flac); --image = the speaker"),
    )
    hook_blocks = (WanS2VTransformerBlock,)
    card_calls = {
        "WanSpeechToVideoPipeline": (  # num_frames: frames per clip; the clips follow the audio
            'image=load_image("person.png"), audio="speech.wav", prompt="a person is talking",\n'
            "             height={height}, width={width}, num_frames_per_clip={num_frames}, "
            "num_inference_steps={num_inference_steps},\n             guidance_scale={guidance_scale}"
        ),
    }
    tiny_arches = {"s2v": TinyArch("s2v", 16, 16)}
    conditionings = (S2V_CONDITIONING,)
    #: DiffSynth-Studio's S2V dataset columns (``input_image`` is the clip's first frame)
    dataset_inputs = {"input_audio": ExtraInput("audio"), "s2v_pose_video": ExtraInput("video")}

    def find_files(self, root: Path, given: dict[str, Any]) -> dict[str, Path | None]:
        folder = given.get("audio_encoder")
        found = Path(folder) if folder else (root / WAV2VEC_DIR if (root / WAV2VEC_DIR).exists() else None)
        return {"audio_encoder": found}

    def load_components(self, files: dict[str, Any], info: DitInfo, variant: WanVariant,
                        torch_dtype: torch.dtype) -> dict[str, Any]:
        """The ``audio_encoder`` (float32, as the original runs it) and ``audio_processor``, checked against the
        DiT."""
        if not variant.audio_encoder:
            return {}
        folder = files["audio_encoder"]
        encoder = load_audio_encoder_from_release(folder)
        processor = load_audio_processor_from_release(folder)
        width, layers = encoder.config.hidden_size, encoder.config.num_hidden_layers + 1
        if (width, layers) != (info.config["audio_dim"], info.config["audio_num_layers"]):
            raise ConversionError(
                f"{folder}: Wav2Vec2 with hidden size {width} and {layers} hidden states, but the DiT's audio encoder "
                f"takes {info.config['audio_dim']} x {info.config['audio_num_layers']} (casual_audio_encoder.*)"
            )
        return {"audio_encoder": encoder, "audio_processor": processor}

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")}
        model = WanS2VTransformer3DModel(
            **kwargs, audio_dim=TINY_WAV2VEC["hidden_size"], audio_num_layers=TINY_WAV2VEC["num_hidden_layers"] + 1,
            audio_inject_layers=TINY_S2V_CONFIG["audio_inject_layers"], pose_dim=TINY_S2V_CONFIG["cond_dim"],
        )
        return model, dict(TINY_S2V_CONFIG, _class_name="WanModel_S2V", audio_dim=TINY_WAV2VEC["hidden_size"])

    def tiny_release_files(self, folder: Path, dit_folder: Path, arch: str, dit_state_dict: dict, seed: int) -> None:
        make_tiny_wav2vec(folder / WAV2VEC_DIR, seed=seed)

    def claims_config(self, config: Any) -> bool:
        return bool(getattr(config, "audio_inject_layers", None))

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return S2V_CONDITIONING if self.claims_config(config) else None
