"""A Hugging Face safetensors checkpoint as a WeightSource: one decoder layer's MoE block, with
each rank reading only the bytes it holds.

`open_checkpoint(folder, layer)` validates everything before any rank starts -- config.json
(a supported family), the layer index, the index file and every safetensors header the layer
needs (corrupt or truncated files), each tensor's presence, shape and dtype -- and returns a
picklable `CheckpointWeights`. Its `weight(spec, name, shard, device)` reads with
`safe_open(...).get_slice`: a rank's F columns of each expert it holds (rows of the stored
[F, H] gate/up projections, columns of the stored [H, F] down projection), sliced in the file
BEFORE the transpose to the engine's [in, out] layout, so only those bytes are copied out of
the file, and each slice goes straight to `device`. `read_bytes` counts them from the slices'
shapes and the stored dtype. Nothing ever holds the whole checkpoint in host memory.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
import dataclasses
from dataclasses import dataclass

import torch

from pyengine.core.errors import InputError, SpecError
from pyengine.core.files import unreadable_file
from pyengine.core.spec import DeploymentSpec
from pyengine.model.checkpoint_experts import StoredExpert, stored_expert
from pyengine.model.hf_config import NOT_IN_LOGITS, HFModel, _json, read_hf_config
from pyengine.model.stages import Shard
from pyengine.model.tensors import MLA, MLA_Q_LORA, PER_EXPERT, SHARED, SHARED_EXPERT_GATE, attention_tensors
from pyengine.model.weights import model_dtype, tensor_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""safetensors dtype codes the loader accepts, and the torch dtype of each."""
PACKED_DTYPES = {"U8": torch.uint8}
"""MXFP4 blocks and scales (bytes), accepted for those tensors only."""
UNTIED_HEAD = "lm_head.weight"
"""A stored output head: used even when config.json says tie_word_embeddings (transformers then
keeps it too, with a warning, when it differs from the embedding)."""
TRANSPOSED = ("router", "out", "wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wkv_b", "ws_gate", "ws_up",
              "ws_down", SHARED_EXPERT_GATE, "wd_gate", "wd_up", "wd_down")
"""Engine weights stored [out, in] by HF linears: read the slice, then transpose to [in, out]."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    file: str
    """File name inside the checkpoint folder."""
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype code (F32, BF16, F16)."""


@dataclass(frozen=True, slots=True)
class _Read:
    """One slice of one stored tensor: `index` is one slice per stored dimension."""

    key: str
    index: tuple[slice, ...]


class CheckpointWeights:
    """A checkpoint as the engine's weights (see module doc): the whole model (layer None: the
    engine's layer l is the checkpoint's layer l), or decoder layer `layer` as the block."""

    def __init__(self, folder: str, hf: HFModel, layer: int | None, tensors: dict[str, TensorInfo]):
        self.folder, self.hf, self.layer, self.tensors = folder, hf, layer, tensors
        self._checked: DeploymentSpec | None = None
        self.names = hf.tensor_names(0 if layer is None else layer)

    def _layer(self, layer: int | None) -> int:
        """The checkpoint layer behind the engine's `layer` (the block's is the one it was opened on)."""
        if self.layer is not None:
            return self.layer
        if layer is None:
            raise ValueError("a whole-model checkpoint needs the layer of a per-layer tensor")
        return layer

    # ---- the WeightSource protocol ---------------------------------------------------
    def weight(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
               device: torch.device | str = "cpu", layer: int | None = None) -> torch.Tensor:
        self.check_spec(spec)
        dtype = tensor_dtype(spec, name)
        if name in PER_EXPERT:  # each expert's slice read, cast (MXFP4: dequantized) on `device`
            return torch.stack([s.finish(name, self._read(reads, device), shard.f_cols, dtype)
                                for s, reads in self._expert_reads(name, shard, layer)])
        t = self._read(self._reads(name, shard, layer), device)[0].to(dtype)  # cast there
        return self.hf.fix_layout(name, (t.T if name in TRANSPOSED else t).contiguous())

    def read_bytes(self, spec: DeploymentSpec, name: str, shard: Shard = Shard(),
                   layer: int | None = None) -> int:
        if name in PER_EXPERT:
            return sum(self._nbytes(r) for _, reads in self._expert_reads(name, shard, layer) for r in reads)
        return sum(self._nbytes(r) for r in self._reads(name, shard, layer))

    def embed_rows(self, spec: DeploymentSpec, ids: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows of the embedding for `ids`, reading only the distinct rows asked for."""
        self.check_spec(spec)
        uniq, inverse = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        reads = [_Read(self.names["embed"], (slice(a, b), slice(None))) for a, b in _runs(uniq.tolist())]
        rows = torch.cat(self._read(reads, device)).to(model_dtype(spec))
        return rows[inverse.to(rows.device)]

    def describe(self) -> str:
        what = f"all {self.hf.num_layers} layers" if self.layer is None else f"layer {self.layer}"
        return f"checkpoint {self.folder} ({self.hf.family}), {what}"

    # ---- slices ----------------------------------------------------------------------
    def _reads(self, name: str, shard: Shard, layer: int | None = None) -> list[_Read]:
        """The stored slices behind engine weight `name` of `layer` restricted to `shard`."""
        if name in SHARED:
            key = self.names[name]
            return [_Read(key, tuple(slice(None) for _ in self.tensors[key].shape))]
        key = self.hf.tensor_names(self._layer(layer))[name]
        index = [slice(None) for _ in self.tensors[key].shape]
        cut = shard.mlp_slice(name)  # a dense MLP's columns held on an expert GPU
        if cut is not None:  # stored [out, in]: the engine's axis is the other one
            axis, a, b = cut
            index[1 - axis] = slice(a, b)
        return [_Read(key, tuple(index))]

    def _expert_reads(self, name: str, shard: Shard, layer: int | None) -> list[tuple[StoredExpert, list[_Read]]]:
        """Per expert of `shard`: where its tensor `name` is stored, and the slices its F columns read."""
        layer = self._layer(layer)
        experts = shard.experts if shard.experts is not None else range(self.hf.num_experts)
        out = []
        for e in experts:
            s = stored_expert(name, self.hf.expert_names(layer, e)[name])
            out.append((s, [_Read(k, i) for k, i in s.reads(shard.f_cols, self.hf.ffn_hidden_size)]))
        return out

    def _nbytes(self, r: _Read) -> int:
        info = self.tensors[r.key]
        n = {**STORED_DTYPES, **PACKED_DTYPES}[info.dtype].itemsize
        for dim, s in zip(info.shape, r.index):
            n *= len(range(*s.indices(dim)))
        return n

    def _read(self, reads: list[_Read], device) -> list[torch.Tensor]:
        """Each slice, read from its file (each file opened once) and moved to `device` at once:
        host memory holds one slice at a time, never a whole tensor of another rank's part."""
        from safetensors import safe_open

        out: list[torch.Tensor | None] = [None] * len(reads)
        by_file: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(reads):
            by_file[self.tensors[r.key].file].append(i)
        for file, positions in by_file.items():
            with safe_open(os.path.join(self.folder, file), framework="pt") as f:
                for i in positions:
                    out[i] = f.get_slice(reads[i].key)[reads[i].index].to(device)
        return out  # type: ignore[return-value]

    def check_spec(self, spec: DeploymentSpec) -> None:
        """SpecError unless `spec` runs this checkpoint: the part it holds (whole model or one
        layer's block) and every model field the logits depend on (NOT_IN_LOGITS may differ)."""
        if spec is self._checked:
            return  # every weight read asks: the comparison is made once per spec
        m, hf = spec.model, self.hf
        if m.layered and self.layer is not None:
            raise SpecError("model.num_layers", m.num_layers,
                            f"the source holds layer {self.layer}'s MoE block only; open the folder "
                            "without layer= for the whole model")
        if not m.layered and self.layer is None:
            raise SpecError("model.num_layers", None,
                            "the source is the whole model; open_checkpoint(folder, layer=N) for one "
                            "layer's block, or build the spec with deployment_spec(source.hf, whole=True)")
        resolved = {"num_key_value_heads": m.kv_heads, "head_dim": m.head_size} if m.mla is None else {}
        for key, fixed in hf.model_fields(whole=m.layered).items():
            if key not in NOT_IN_LOGITS and _json(resolved.get(key, getattr(m, key))) != fixed:
                raise SpecError(f"model.{key}", getattr(m, key),
                                f"disagrees with the checkpoint ({hf.source}: {hf.config_key(key)} gives "
                                f"{fixed!r}); build the spec with deployment_spec(source.hf, ...)")
        self._checked = spec


def _runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive ids: one slice per run instead of one per row."""
    runs: list[tuple[int, int]] = []
    for i in sorted_ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


# ---- opening and validating ---------------------------------------------------------------

def open_checkpoint(folder: str | os.PathLike, layer: int | None = None) -> CheckpointWeights:
    """Validate `folder` for the whole model (layer None) or for decoder layer `layer`'s MoE
    block, and return its weight source. Every problem is one InputError naming the file,
    tensor or option, raised before any rank starts."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError("folder", type(folder).__name__, "must be a path (a Hugging Face model folder)")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise InputError("layer", layer, "must be an integer (a decoder layer's index) or None")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError("folder", folder, "is not a directory (a Hugging Face model folder)")
    hf = read_hf_config(folder)
    if layer is None:
        hf.check_whole()
    else:
        hf.check_layer(layer)
    weight_map = _weight_map(folder)
    if hf.tie_word_embeddings and UNTIED_HEAD in weight_map:
        hf = dataclasses.replace(hf, tie_word_embeddings=False)  # transformers too uses a stored head
    expected = (_expected_shapes(hf, layer) if layer is not None
                else {k: v for i in range(hf.num_layers) for k, v in _expected_shapes(hf, i, True).items()})
    missing = [k for k in expected if k not in weight_map]
    if missing:
        where = INDEX_FILE if os.path.exists(os.path.join(folder, INDEX_FILE)) else SINGLE_FILE
        who = "the whole model" if layer is None else f"layer {layer}'s block"
        raise InputError("tensor", missing[0], f"missing from {os.path.join(folder, where)} "
                                               f"({who} needs it; {len(missing)} missing)")
    tensors = _headers(folder, {k: weight_map[k] for k in expected})
    for key, shape in expected.items():
        info = tensors[key]
        if info.shape != shape:
            raise InputError("tensor", key, f"has shape {list(info.shape)} in {info.file}; config.json "
                                            f"({hf.family}) implies {list(shape)}")
        packed = hf.experts_mxfp4 and key.endswith(("_blocks", "_scales")) and info.dtype in PACKED_DTYPES
        if info.dtype not in STORED_DTYPES and not packed:
            raise InputError("tensor", key, f"is stored as {info.dtype} in {info.file}; the loader reads "
                                            f"{sorted(STORED_DTYPES)}")
    return CheckpointWeights(folder, hf, layer, tensors)


def _expected_shapes(hf: HFModel, layer: int, attention: bool = False) -> dict[str, tuple[int, ...]]:
    """HF name -> stored shape ([out, in] for linears) of every tensor layer `layer` reads (the
    block's; with `attention`, its attention's too), plus the shared ones."""
    h, f, e, v = hf.hidden_size, hf.ffn_hidden_size, hf.num_experts, hf.vocab_size
    names = hf.tensor_names(layer)
    out = {names["embed"]: (v, h), names["norm_in"]: (h,), names["norm_out"]: (h,), names["out"]: (v, h)}
    if attention:
        out.update(_mla_stored_shapes(hf, names) if hf.mla is not None else _gqa_stored_shapes(hf, names))
    if attention and layer in hf.dense_layers:  # a dense MLP, no router, no experts
        d = hf.dense_ffn_size
        out.update({names["wd_gate"]: (d, h), names["wd_up"]: (d, h), names["wd_down"]: (h, d)})
        return out
    out[names["router"]] = (e, h)
    if hf.router_bias:
        out[names["router_bias"]] = (e,)
    if hf.grouped_routing is not None:
        out[names["router_correction"]] = (e,)
    if hf.shared_expert_size:
        s = hf.shared_expert_size
        out.update({names["ws_gate"]: (s, h), names["ws_up"]: (s, h), names["ws_down"]: (h, s)})
        if hf.shared_expert_gate:
            out[names[SHARED_EXPERT_GATE]] = (1, h)
    for i in range(e):
        for name, where in hf.expert_names(layer, i).items():
            out.update(stored_expert(name, where).stored_shapes(h, f, name))
    return out


def _gqa_stored_shapes(hf: HFModel, names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """HF name -> stored shape of a layer's attention tensors (linears [out, in]; its biases)."""
    h = hf.hidden_size
    q, kv = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    norm = hf.head_dim if hf.qk_norm == "per_head" else None
    stored = {"attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
              "q_norm": (norm or q,), "k_norm": (norm or kv,), "bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (h,)}
    out = {names[n]: stored[n] for n in attention_tensors(hf.qk_norm, hf.biased)}
    if hf.attention_sinks:
        out[names["sinks"]] = (hf.num_attention_heads,)
    return out


def _mla_stored_shapes(hf: HFModel, names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """HF name -> stored shape of a layer's MLA tensors (linears [out, in])."""
    m, h, n = hf.mla, hf.hidden_size, hf.num_attention_heads
    stored = {"attn_norm": (h,), "wkv_a": (m.latent_width, h), "kv_a_norm": (m.kv_lora_rank,),
              "wkv_b": (n * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank), "wo": (h, n * m.v_head_dim),
              "wq": (n * m.qk_head_dim, h), "wq_a": (m.q_lora_rank, h), "q_a_norm": (m.q_lora_rank,),
              "wq_b": (n * m.qk_head_dim, m.q_lora_rank)}
    keep = MLA + (MLA_Q_LORA if m.q_lora_rank is not None else ("wq",))
    return {names[k]: stored[k] for k in keep}


def _weight_map(folder: str) -> dict[str, str]:
    """Tensor name -> file, from the index of a sharded checkpoint or the single file's header."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, "rb") as fh:
                data = json.loads(fh.read())
        except (OSError, ValueError) as e:
            raise InputError(index, "", f"cannot be read as JSON: {e}") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(index, "weight_map", "must map tensor names to file names")
        for file in set(wm.values()):
            if os.path.basename(file) != file:
                raise InputError(index, file, "a shard must be a file name inside the model folder")
        return wm
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.lexists(single):  # a link that leads nowhere is reported by _open, as such
        found = sorted(os.listdir(folder))[:6]
        raise InputError("folder", folder, f"has neither {SINGLE_FILE} nor {INDEX_FILE} "
                                              f"(only safetensors checkpoints are read; found {found})")
    return {k: SINGLE_FILE for k in _open(single, lambda f: list(f.keys()))}


def _headers(folder: str, files_of: dict[str, str]) -> dict[str, TensorInfo]:
    """Shape and dtype of each wanted tensor from its file's header (no tensor data is read)."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for key, file in files_of.items():
        by_file[file].append(key)
    out: dict[str, TensorInfo] = {}
    for file, keys in sorted(by_file.items()):
        path = os.path.join(folder, file)

        def info(f, keys=keys, file=file, path=path):
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise InputError("tensor", key, f"missing from {path} (the index names that file)")
                sl = f.get_slice(key)
                out[key] = TensorInfo(file, tuple(sl.get_shape()), sl.get_dtype())

        _open(path, info)
    return out


def _open(path: str, body):
    """Run body(f) on an opened safetensors file; a missing, corrupt or truncated file is one
    InputError naming it (safetensors checks the header and that it covers the whole file)."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    problem = unreadable_file(path)
    if problem == "does not exist":
        raise InputError("checkpoint file", name, f"does not exist in {os.path.dirname(path)}")
    if problem is not None:  # a folder, a symlink loop, an unreadable or empty file: say which
        raise InputError("checkpoint file", name, f"{problem} (in {os.path.dirname(path)})")
    try:
        with safe_open(path, framework="pt") as f:
            return body(f)
    except SafetensorError as e:
        raise InputError("checkpoint file", name, f"is not a valid safetensors file, corrupt or truncated "
                                                  f"({str(e).splitlines()[0]})") from None
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__  # an OSError need not carry an errno
        raise InputError("checkpoint file", name, f"cannot be read: {why}") from None
