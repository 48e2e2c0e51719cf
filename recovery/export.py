"""One model file from a checkpoint: `python -m recovery.export <checkpoint dir> <out dir>`.

Reads a sealed checkpoint (<run_dir>/checkpoints/step_<N>, every stage's DCP shards) or a salvage set
(<run_dir>/checkpoints/salvage/step_<N>) in one process, without a process group, and writes
  <out>/model.pt     a plain fp32 state_dict of the whole model (every stage). Replicas that differ
                     (DiLoCo / NoLoCo: one set of weights per replica) are averaged; DDP saves one.
  <out>/config.yaml  the run's config (<run_dir>/config.yaml) with model.vocab_size filled in.
Parameter names are Hugging Face Llama's (LlamaForCausalLM):
  embed.weight                        model.embed_tokens.weight
  layers.<i>.attn_norm.weight         model.layers.<i>.input_layernorm.weight
  layers.<i>.attn.w{q,k,v,o}.weight   model.layers.<i>.self_attn.{q,k,v,o}_proj.weight
  layers.<i>.ffn_norm.weight          model.layers.<i>.post_attention_layernorm.weight
  layers.<i>.ffn.w1 / w3 / w2.weight  model.layers.<i>.mlp.gate_proj / up_proj / down_proj.weight
  norm.weight                         model.norm.weight
  head.weight                         lm_head.weight (not tied to the embedding)
q_proj and k_proj rows are permuted to Hugging Face's RoPE layout: flotilla rotates adjacent pairs (x0, x1),
(x2, x3), ... of each head, Hugging Face the first half of a head against its second half, so each head's rows go
from (pair, 2) to (2, pair) order. `load_model` undoes both. The config maps as dim -> hidden_size,
n_layers -> num_hidden_layers, n_heads -> num_attention_heads, n_kv_heads -> num_key_value_heads,
model.ffn.w1's rows -> intermediate_size, norm_eps -> rms_norm_eps, rope_theta -> rope_theta. Training restarts
RoPE positions at every document of a packed sequence; one document per sequence is the same thing.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from config import Config, ConfigError, ModelConfig, to_yaml
from recovery.checkpoint import MANIFEST, SALVAGE, CheckpointError, parse_extra_name, verify

TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
LAYER = {"attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
         "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj"}


def hf_name(name: str) -> str:
    """A flotilla parameter name (model/stages.py: layers.<i>.<part>.weight, global i) -> Hugging Face Llama's."""
    if name in TOP:
        return TOP[name]
    _, i, part = name.removesuffix(".weight").split(".", 2)
    return f"model.layers.{i}.{LAYER[part]}.weight"


def flotilla_name(name: str) -> str:
    ours = {v: k for k, v in TOP.items()}
    if name in ours:
        return ours[name]
    _, _, i, part = name.removesuffix(".weight").split(".", 3)
    return f"layers.{i}.{dict(map(reversed, LAYER.items()))[part]}.weight"


def rope_heads(name: str, m: ModelConfig) -> int:
    """Heads of a q / k projection (flotilla name), 0 for any other parameter."""
    part = name.removesuffix(".weight").split(".", 2)[-1]
    return {"attn.wq": m.n_heads, "attn.wk": m.n_kv_heads}.get(part, 0)


def rope_rows(w: torch.Tensor, heads: int, to_hf: bool) -> torch.Tensor:
    """Each head's rows from adjacent-pair order to half-and-half order (to_hf), or back."""
    half = w.shape[0] // heads // 2
    shape = (heads, half, 2, -1) if to_hf else (heads, 2, half, -1)
    return w.reshape(shape).transpose(1, 2).reshape(w.shape)


def read_replicas(path: str) -> list[dict[str, torch.Tensor]]:
    """Every replica's whole-model weights (flotilla names) in a verified checkpoint folder."""
    if os.path.basename(os.path.dirname(os.path.normpath(path))) == SALVAGE:
        by_replica: dict[int, dict] = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".pt") and parse_extra_name(name)[2] == 0:  # lanes hold the same stage weights
                state = torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
                by_replica.setdefault(parse_extra_name(name)[0], {}).update(state["model"])
        return [by_replica[r] for r in sorted(by_replica)]
    try:
        meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in meta.items()
                 if ".model." in key and hasattr(m, "size")}
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process on purpose
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except Exception as err:  # DCP raises many types; name the checkpoint and the cause
        raise CheckpointError(f"checkpoint {path} could not be read: {str(err).splitlines()[0]}") from None
    replicas: dict[str, dict] = {}
    for key, tensor in state.items():
        namespace, _, name = key.partition(".model.")
        replicas.setdefault(namespace, {})[name] = tensor
    return [replicas[k] for k in sorted(replicas, key=lambda ns: int(ns.removeprefix("replica")))]


def consolidate(replicas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The replicas' mean (fp32), checked to be whole models with the same parameters."""
    names = set(replicas[0]) if replicas else set()
    if not names or any(set(r) != names for r in replicas) or not {"embed.weight", "head.weight"} <= names:
        raise CheckpointError("the checkpoint does not hold every stage of every replica it names: export a "
                              "sealed checkpoint (checkpoints/step_<N>)")
    return {name: torch.stack([r[name].float() for r in replicas]).mean(0) for name in sorted(names)}


def run_config(path: str) -> Config:
    """The config.yaml of the run a checkpoint folder belongs to (two levels up, three for a salvage set)."""
    up = 3 if os.path.basename(os.path.dirname(os.path.normpath(path))) == SALVAGE else 2
    run_dir = os.path.normpath(os.path.join(path, *[".."] * up))
    found = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(found):
        raise CheckpointError(f"no config.yaml in {run_dir}: export a checkpoint inside its run folder "
                              f"(<run_dir>/checkpoints/step_<N>)")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(found)))


def export(path: str, out: str) -> str:
    """Write <out>/model.pt and <out>/config.yaml; returns the model file's path."""
    if not os.path.isdir(path) or not any(f.endswith((".distcp", ".pt")) or f == MANIFEST for f in os.listdir(path)):
        raise CheckpointError(f"{path} is not a checkpoint folder: pass one such as <run_dir>/checkpoints/step_<N>")
    verify(path)
    cfg = run_config(path)
    weights = consolidate(read_replicas(path))
    cfg.model.vocab_size = weights["embed.weight"].shape[0]
    hf = {hf_name(name): rope_rows(w, heads, to_hf=True) if (heads := rope_heads(name, cfg.model)) else w
          for name, w in weights.items()}
    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "model.pt")
    torch.save(hf, model_path + ".tmp")
    os.replace(model_path + ".tmp", model_path)
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        fh.write(to_yaml(cfg))
    return model_path


def load_model(out: str):
    """The exported model as one flotilla Stage holding every layer (model/stages.py), and its Config."""
    from model.stages import build_stage
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(os.path.join(out, "config.yaml"))))
    m: ModelConfig = cfg.model
    module = build_stage(m, 0, 1, cfg.data.seq_len, cfg.train.seed)
    state = {}
    for name, w in torch.load(os.path.join(out, "model.pt"), map_location="cpu").items():
        ours = flotilla_name(name)
        state[ours] = rope_rows(w, heads, to_hf=False) if (heads := rope_heads(ours, m)) else w
    module.load_state_dict(state)
    return module, cfg


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m recovery.export <checkpoint dir> <out dir>")
    try:
        path = export(*argv)
    except (CheckpointError, ConfigError) as err:
        print(f"flotilla: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {argv[0]} -> {path} and {os.path.join(argv[1], 'config.yaml')}")


if __name__ == "__main__":
    main(sys.argv[1:])
