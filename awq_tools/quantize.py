"""``awq_tools quantize``: stream a checkpoint's language model through AWQ one decoder layer at a time.

What is in memory at once: one decoder layer (float32) and the calibration hidden states [samples, seqlen,
hidden]; never the model. Each layer is read from the input shards, run on the calibration activations to
collect statistics and the next layer's input (from the original float layer, as LMDeploy does), smoothed,
RTN-quantized, and written as its own output shard.

XComposer2 (InternLM2 with Partial-LoRA, xcomposer2.md §8): the five base linears are quantized, Plora_A/B stay
16-bit. Calibration is text-only, as LMDeploy's: it gives no image rows, so statistics and the scale search see
the base path alone. The LoRA branch (image rows) is kept exact by folding instead: where a scale s divides a
linear's input, that linear's Plora_A columns are multiplied by s too (it reads the same normed input), and where
s divides w3's output rows before w2, w3's Plora_B rows are divided by s and w2's Plora_A multiplied by it.
LMDeploy does not fold these, so its checkpoints change the float model's image rows. Everything outside the decoder layers (vision tower,
projector, embeddings, final norm, LM head) is copied unchanged in chunks of at most ``REST_SHARD_BYTES``.

Resuming: the work happens in a hidden sibling ``.<name>.partial`` of the output folder. After each layer its
shard, the next layer's input activations and ``state.json`` are written (each fsynced and renamed into place,
in that order);
a rerun with the same input and settings continues after the last finished layer. ``state.json`` holds a
fingerprint of the input (every shard's header and size, config.json, the settings, the calibration ids) and a
sha256 of each finished layer's input tensors, which a rerun re-reads and checks, so a changed input starts
over instead of being mixed in. When the last layer is done the folder is completed (index, config,
tokenizer and processor files, quant_report.json), marked finished and renamed to the output name in one step:
that rename is the commit point. state.json goes only after it, so a kill just before the rename resumes
with nothing to recompute, and one just after leaves a complete folder whose state.json a rerun removes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from awq_tools.awq import (DEFAULT_ALPHA, ChannelStats, output_error_smoothed, pseudo_quantize,
                           quantize_linear, search_ratio, smoothing_scales, weight_importance)
from awq_tools.backbones import backbone_for, llm_config_of, llm_prefix_of, rotary_tables
from awq_tools.shards import (INDEX_FILE, CheckpointIndex, copy_file_atomically, fsync_dir, save_shard_atomically,
                              tensor_digest, write_json_atomically, write_text_atomically)
from internvl_kernels import dequantize_awq
from internvl_plugin.awq_checkpoint import find_quantization_config
from internvl_plugin.json_files import JsonFileError, parse_json_object, read_json_object

__all__ = ["QuantizeSettings", "QuantizeError", "quantize", "partial_dir_for"]

FORMAT_VERSION = 1
REST_SHARD_BYTES = 1 << 30
SEARCH_TOKENS = 4096          # tokens per sub-block the scale search scores on
REPORT_TOKENS = 256           # tokens per linear the error report scores on (without --search-scale)
STATE_FILE = "state.json"
_NOT_COPIED = {"config.json", INDEX_FILE, "tiny_build.json", "quant_config.json", "quantize_config.json",
               "inputs_stats.pth", "outputs_stats.pth"}
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


class QuantizeError(ValueError):
    """A bad input or setting: the message is one line naming the culprit."""


@dataclass(frozen=True)
class QuantizeSettings:
    calib_dataset: str = "wikitext2"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    w_bits: int = 4
    w_group_size: int = 128
    batch_size: int = 1
    search_scale: bool = False
    device: str = "cpu"
    dtype: str = "auto"


def partial_dir_for(work_dir: Path) -> Path:
    return work_dir.parent / f".{work_dir.name}.partial"


def quantize(model: Path, work_dir: Path, settings: QuantizeSettings, *, quiet: bool = False,
             log=None, smooth_only: bool = False) -> Path:
    """Quantize ``model`` (a checkpoint folder) into ``work_dir``; returns ``work_dir``. Raises QuantizeError.

    ``smooth_only``: write the smoothed 16-bit checkpoint instead (no quantization_config), to check that
    folding the scales leaves the model's output unchanged.
    """
    log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
    job = _Job(Path(model), Path(work_dir), settings, quiet, log)
    job.smooth_only = smooth_only
    job.run()
    return job.work_dir


class _Job:
    def __init__(self, model: Path, work_dir: Path, settings: QuantizeSettings, quiet: bool, log):
        self.model, self.work_dir, self.s, self.quiet, self.log = model, work_dir, settings, quiet, log
        self._validate()

    # ------------------------------------------------------------------------------ checks before any write
    def _validate(self) -> None:
        from awq_tools.backbones import UnsupportedModel
        from awq_tools.shards import BadCheckpoint

        s, model = self.s, self.model
        if s.w_bits != 4:
            raise QuantizeError(f"--w-bits {s.w_bits}: only 4-bit weights are supported (AWQ gemm)")
        if s.dtype not in ("auto", *_DTYPES):
            raise QuantizeError(f"--dtype {s.dtype!r}: use auto, float16 or bfloat16")
        if s.device.startswith("cuda") and not torch.cuda.is_available():
            raise QuantizeError(f"--device {s.device}: no CUDA device here; use --device cpu")
        config_file = model / "config.json"
        if not model.is_dir():
            raise QuantizeError(f"{model}: no such folder")
        try:
            self.config_bytes = config_file.read_bytes()
            self.config = parse_json_object(self.config_bytes, config_file)
        except FileNotFoundError:
            raise QuantizeError(f"{config_file}: no such file") from None
        except OSError as exc:
            raise QuantizeError(f"{config_file}: cannot read ({exc.strerror or exc})") from None
        except JsonFileError as exc:
            raise QuantizeError(str(exc)) from None
        found = find_quantization_config(self.config, model)
        if found is not None:
            raise QuantizeError(f"{model}: already quantized ({found.file} "
                                f"{(found.holder + '.') if found.holder else ''}quantization_config "
                                f"quant_method={found.quant_method!r}); give the 16-bit checkpoint")
        try:
            self.backbone, self.shape = backbone_for(self.config)
            self.index = CheckpointIndex(model)
        except (UnsupportedModel, BadCheckpoint) as exc:
            raise QuantizeError(f"{model}: {exc}" if not str(exc).startswith(str(model)) else str(exc)) from None
        plora = [n for n in self.index.tensors if ".Plora_" in n]
        if plora and self.backbone.name != "InternLM2ForCausalLM":
            raise QuantizeError(f"{model}: Partial-LoRA tensors (e.g. {plora[0]!r}) beside a "
                                f"{self.backbone.name} backbone; awq_tools folds them only for InternLM2 (XComposer2)")
        quantized = [n for n in self.index.tensors if n.endswith(".qweight")]
        if quantized:
            raise QuantizeError(f"{model}: already quantized (tensor {quantized[0]!r}); give the 16-bit checkpoint")
        self.lcfg = llm_config_of(self.config)
        self.prefix = llm_prefix_of(self.config)
        g = s.w_group_size
        if g <= 0:
            raise QuantizeError(f"--w-group-size {g}: must be positive")
        for name, (n, k) in self.backbone.linear_shapes(self.shape).items():
            if k % g:
                raise QuantizeError(f"--w-group-size {g} does not divide K={k} of {name} (in_features); "
                                    f"pick a divisor of {k} such as {math.gcd(k, 128)}")
            if n % 8:
                raise QuantizeError(f"{name}: out_features {n} is not a multiple of 8; AWQ gemm cannot pack it")
        for i in range(self.shape["layers"]):
            for name, (n, k) in self.backbone.linear_shapes(self.shape).items():
                self._expect(f"{self._layer_prefix(i)}{name}.weight", (n, k))
            for norm in self.backbone.norms:
                self._expect(f"{self._layer_prefix(i)}{norm}.weight", (self.shape["hidden"],))
            for name, (n, k) in self.backbone.linear_shapes(self.shape).items():
                a, b = (f"{self._layer_prefix(i)}{name}.Plora_{x}.weight" for x in "AB")
                if (a in self.index.tensors) != (b in self.index.tensors):
                    raise QuantizeError(f"{model}: tensor {(b if a in self.index.tensors else a)!r} is missing "
                                        "from the checkpoint (Partial-LoRA comes in A/B pairs)")
                if a in self.index.tensors:
                    rank = self.index.tensors[a].shape[0]
                    self._expect(a, (rank, k))
                    self._expect(b, (n, rank))
        self._expect(self.prefix + self.backbone.embed, (self.shape["vocab"], self.shape["hidden"]))
        self.leftover_state = False
        if self.work_dir.exists() and (not self.work_dir.is_dir() or any(self.work_dir.iterdir())):
            if not (self.work_dir / STATE_FILE).is_file():
                raise self._exists_error()
            self.leftover_state = True  # a run killed right after its final rename: run() checks it
        self.out_dtype = _DTYPES.get(s.dtype) or _DTYPES.get(str(self.lcfg.get("torch_dtype", "")), torch.float16)

    def _exists_error(self) -> QuantizeError:
        return QuantizeError(f"--work-dir {self.work_dir}: already exists and is not empty; remove it or pick "
                             "another folder")

    def _expect(self, name: str, shape: tuple[int, ...]) -> None:
        info = self.index.tensors.get(name)
        if info is None:
            raise QuantizeError(f"{self.model}: tensor {name!r} is missing from the checkpoint")
        if info.shape != shape:
            raise QuantizeError(f"{self.model}: tensor {name!r} has shape {list(info.shape)}, "
                                f"config.json implies {list(shape)}")

    def _layer_prefix(self, i: int) -> str:
        return f"{self.prefix}model.layers.{i}."

    # ------------------------------------------------------------------------------ the run
    def run(self) -> None:
        ids = self._calibration_ids()
        fingerprint = self._fingerprint(ids)
        if self.leftover_state:
            done = _read_json(self.work_dir / STATE_FILE)
            if not (done and done.get("fingerprint") == fingerprint and done.get("finished")):
                raise self._exists_error()
            # the same run, killed after the rename that completed it: only its progress record is left to drop
            (self.work_dir / STATE_FILE).unlink()
            fsync_dir(self.work_dir)
            self.log(f"awq_tools quantize: {self.work_dir} was already complete")
            return
        partial = partial_dir_for(self.work_dir)
        state = self._resume_state(partial, fingerprint)
        if state is None:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            state = {"fingerprint": fingerprint, "rest_done": False, "rest_digest": None, "layers_done": 0,
                     "layer_digests": [], "report": []}
            write_json_atomically(state, partial / STATE_FILE)
        self.partial, self.state = partial, state
        plan = self._plan_shards()
        if not state["rest_done"]:
            self._copy_rest(plan)
        if state["layers_done"] < self.shape["layers"]:
            self._quantize_layers(self._layer_input(ids, state["layers_done"]), plan)
        self._finish(plan)

    def _calibration_ids(self) -> torch.Tensor:
        from transformers import AutoTokenizer

        from awq_tools.calib import calibration_ids
        from internvl_plugin.configs import register_configs

        register_configs()
        try:
            tok = AutoTokenizer.from_pretrained(str(self.model), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is one line for the user
            raise QuantizeError(f"{self.model}: cannot load the tokenizer ({str(exc).splitlines()[0][:200]})") from None
        return calibration_ids(self.s.calib_dataset, tok, self.s.calib_samples, self.s.calib_seqlen)

    def _fingerprint(self, ids: torch.Tensor) -> str:
        h = hashlib.sha256(f"awq_tools/{FORMAT_VERSION}".encode())
        h.update(self.index.fingerprint().encode())
        h.update(self.config_bytes)
        settings = asdict(self.s)
        settings.pop("device")  # the same arithmetic, wherever it ran
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(ids.numpy().tobytes())
        h.update(b"smooth_only" if self.smooth_only else b"")
        return h.hexdigest()

    def _resume_state(self, partial: Path, fingerprint: str) -> dict | None:
        state = _read_json(partial / STATE_FILE)
        if state is None:
            return None
        if state.get("fingerprint") != fingerprint:
            self.log(f"awq_tools quantize: {partial} was started with another input or settings; starting over")
            return None
        if state["rest_done"] and self._rest_digest(self._plan_shards()) != state["rest_digest"]:
            self.log("awq_tools quantize: the input's non-layer tensors changed since the interrupted run; starting over")
            return None
        for i, digest in enumerate(state["layer_digests"]):
            if tensor_digest(self.index.load(self._layer_names(i))) != digest:
                self.log(f"awq_tools quantize: input layer {i} changed since the interrupted run; starting over")
                return None
        done = state["layers_done"]
        if 0 < done < self.shape["layers"] and not (partial / _hidden_name(done)).is_file():
            return None
        if state["layers_done"] or state["rest_done"]:
            self.log(f"awq_tools quantize: resuming after layer {state['layers_done']} of {self.shape['layers']}")
        return state

    # ------------------------------------------------------------------------------ shards
    def _layer_names(self, i: int) -> list[str]:
        p = self._layer_prefix(i)
        return sorted(n for n in self.index.tensors if n.startswith(p))

    def _rest_names(self) -> list[str]:
        layers = f"{self.prefix}model.layers."
        return sorted(n for n in self.index.tensors if not n.startswith(layers))

    def _plan_shards(self) -> dict:
        chunks, size = [[]], 0
        for name in self._rest_names():
            nbytes = self.index.tensors[name].nbytes
            if chunks[-1] and size + nbytes > REST_SHARD_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(name)
            size += nbytes
        chunks = [c for c in chunks if c]
        total = len(chunks) + self.shape["layers"]
        names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        return {"rest": list(zip(names, chunks)), "layers": names[len(chunks):]}

    def _copy_rest(self, plan: dict) -> None:
        digests = []
        for fname, names in plan["rest"]:
            tensors = self.index.load(names)
            digests.append(tensor_digest(tensors))
            save_shard_atomically(tensors, self.partial / fname)
            del tensors
        self.state["rest_done"] = True
        self.state["rest_digest"] = _combine(digests)
        write_json_atomically(self.state, self.partial / STATE_FILE)

    def _rest_digest(self, plan: dict) -> str:
        return _combine([tensor_digest(self.index.load(names)) for _, names in plan["rest"]])

    def _layer_input(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        if layer:
            return load_file(str(self.partial / _hidden_name(layer)))["hidden"]
        name = self.prefix + self.backbone.embed
        table = self.index.load([name])[name]
        hidden = table[ids].float()
        del table
        return hidden

    # ------------------------------------------------------------------------------ layers
    def _quantize_layers(self, hidden: torch.Tensor, plan: dict) -> None:
        layers, start = self.shape["layers"], self.state["layers_done"]
        seqlen = hidden.shape[1]
        rope = rotary_tables(self.lcfg, self.shape, seqlen)
        keep = max(1, min(hidden.shape[0], SEARCH_TOKENS // seqlen)) * seqlen if self.s.search_scale \
            else min(REPORT_TOKENS, hidden.shape[0] * seqlen)
        device = torch.device(self.s.device)
        bar = tqdm(total=layers, initial=start, desc="awq_tools quantize", unit="layer", disable=self.quiet,
                   file=sys.stderr, dynamic_ncols=True)
        bb_linear0 = self.backbone.linears[0]
        for i in range(start, layers):
            names = self._layer_names(i)
            raw = self.index.load(names)
            digest = tensor_digest(raw)
            p = self._layer_prefix(i)
            stored = {n[len(p):]: t for n, t in raw.items() if not n.endswith(".weight") or t.dim() == 1}
            stored["__linear_dtype__"] = raw[p + bb_linear0 + ".weight"].dtype
            stored["__dtypes__"] = {n[len(p):]: t.dtype for n, t in raw.items()}
            w = {}
            for n in names:  # one tensor at a time: never the 16-bit and the float32 layer at once
                w[n[len(p):]] = raw.pop(n).to(device=device, dtype=torch.float32)
            del raw
            stats: dict[str, ChannelStats] = {}

            def observe(name, x):
                stats.setdefault(name, ChannelStats()).update(x, keep)

            out = torch.empty_like(hidden)
            with torch.no_grad():
                for b in range(0, hidden.shape[0], self.s.batch_size):
                    chunk = hidden[b:b + self.s.batch_size].to(device)
                    cos, sin = (t.to(device) for t in rope)
                    out[b:b + self.s.batch_size] = self.backbone.forward(w, chunk, (cos, sin), self.shape,
                                                                          observe).cpu()
                tensors, report = self._quantize_layer(w, stats, rope, device, stored, p)
            tensors = {p + n: t for n, t in tensors.items()}
            save_shard_atomically(tensors, self.partial / plan["layers"][i])
            if i + 1 < layers:  # the next layer's input, durable before the record that points at it
                save_shard_atomically({"hidden": out}, self.partial / _hidden_name(i + 1))
            self.state["layers_done"] = i + 1
            self.state["layer_digests"].append(digest)
            self.state["report"].append({"layer": i, **report})
            write_json_atomically(self.state, self.partial / STATE_FILE)
            (self.partial / _hidden_name(i)).unlink(missing_ok=True)
            hidden = out
            del w, stats, tensors
            bar.update(1)
        bar.close()

    def _quantize_layer(self, w: dict[str, torch.Tensor], stats: dict[str, ChannelStats], rope, device,
                        stored: dict[str, torch.Tensor], prefix: str):
        """Smooth (norm groups, then fc groups), quantize every linear; the layer's output tensors and report
        (``w``'s names are relative to ``prefix``, the layer's, which the warnings name in full)."""
        g, bb, shape = self.s.w_group_size, self.backbone, self.shape
        # only the small tensors are kept as they were: a linear's original weight is recovered exactly from the
        # smoothed one (power-of-two scales), and its round-to-nearest error is taken before smoothing
        original = {n: t.clone() for n, t in w.items() if t.dim() < 2}
        rtn_err = {n: output_error_smoothed(stats[n].inputs().to(device), None, w[n + ".weight"],
                                            pseudo_quantize(w[n + ".weight"], g)) for n in bb.linears}
        input_scale: dict[str, torch.Tensor] = {}
        row_scale: dict[str, torch.Tensor] = {}
        report: dict = {"groups": {}, "linears": {}}
        for group in bb.norm_groups:
            st = stats[group.linears[0]]
            norm_w = w[group.norm + ".weight"]
            weights = [w[n + ".weight"] for n in group.linears]
            if self.s.search_scale:
                x = st.inputs().to(device)

                def run(trial, group=group, x=x):
                    ww = dict(w, **{n + ".weight": t for n, t in zip(group.linears, trial)})
                    if group.block == "attn":
                        seq = rope[0].shape[0]
                        xs = x.view(-1, seq, x.shape[-1])
                        return bb.attention(ww, xs, tuple(t.to(device) for t in rope), shape)
                    return bb.mlp(ww, x, shape)

                ratio, s, _ = search_ratio(st.absmean.to(device), weights, g, run, norm_weight=norm_w)
            else:
                ratio = DEFAULT_ALPHA
                s = smoothing_scales(st.absmax.to(device), weight_importance(weights, g), ratio, norm_w)
            w[group.norm + ".weight"] = norm_w / s
            del weights
            for n in group.linears:
                w[n + ".weight"].mul_(s)  # in place: no second copy of a large linear
                input_scale[n] = s
                if n + ".Plora_A.weight" in w:
                    # XComposer2: the LoRA branch (image rows) reads the same normed input, now x / s
                    w[n + ".Plora_A.weight"].mul_(s)
            report["groups"][group.norm] = {"ratio": ratio}
        for group in bb.fc_groups(shape):
            st = stats[group.next]
            rows = group.rows(shape)
            weights = [w[group.next + ".weight"]]
            if self.s.search_scale:
                x = st.inputs().to(device)
                ratio, s, _ = search_ratio(st.absmean.to(device), weights, g, lambda t, x=x: x @ t[0].t())
            else:
                ratio = DEFAULT_ALPHA
                s = smoothing_scales(st.absmax.to(device), weight_importance(weights, g), ratio)
            del weights
            prev = w[group.prev + ".weight"]
            prev[rows].div_(s[:, None])
            if group.prev + ".bias" in w:
                w[group.prev + ".bias"][rows].div_(s)
            w[group.next + ".weight"].mul_(s)
            input_scale[group.next] = s
            if group.prev + ".Plora_B.weight" in w:
                # XComposer2: prev's output on image rows is W x + B A x; both parts are divided by s
                w[group.prev + ".Plora_B.weight"][rows].div_(s[:, None])
            if group.next + ".Plora_A.weight" in w:
                w[group.next + ".Plora_A.weight"].mul_(s)
            rs = torch.ones(prev.shape[0], device=prev.device)
            rs[rows] = s
            row_scale[group.prev] = rs
            report["groups"][f"{group.prev}->{group.next}"] = {"ratio": ratio}
        out: dict[str, torch.Tensor] = {}
        weight_dtype = stored.pop("__linear_dtype__")
        dtypes = stored.pop("__dtypes__")
        for name in [n for n in w if ".Plora_" in n]:
            # Partial-LoRA stays 16-bit in its stored dtype: scaled by powers of two only, so no bit is lost
            # unless a value leaves the dtype's range (float16: past 65504 or into subnormals)
            t = w.pop(name)
            out[name] = t.to(dtypes[name]).cpu()
            lost = int((out[name].to(t.device, t.dtype) != t).sum())
            if lost:
                report.setdefault("plora_values_rounded", {})[name] = lost
                self.log(f"awq_tools quantize: warning: {lost} value(s) of {prefix}{name} left {dtypes[name]}'s "
                         "exact range when the smoothing scales were folded in; the image rows will differ slightly")
        for n in bb.linears:
            if self.smooth_only:
                out[n + ".weight"] = w[n + ".weight"].to(weight_dtype).cpu()
                continue
            qweight, qzeros, scales = quantize_linear(w[n + ".weight"], g, self.out_dtype)
            out.update({f"{n}.qweight": qweight.cpu(), f"{n}.qzeros": qzeros.cpu(), f"{n}.scales": scales.cpu()})
            x = stats[n].inputs().to(device)
            s = input_scale.get(n)
            approx = dequantize_awq(qweight, qzeros, scales, g, dtype=torch.float32).t()
            weight = w[n + ".weight"]
            if s is not None:
                weight = weight / s
            if n in row_scale:
                weight = weight * row_scale[n][:, None]
            # the smoothed linear sees x / s: compare its output with the original x @ W^T
            awq_err = output_error_smoothed(x, s, weight, approx, row_scale.get(n))
            del weight
            report["linears"][n] = {"awq_rel_mse": awq_err, "rtn_rel_mse": rtn_err[n]}
        for name, t in w.items():
            base = name.rsplit(".", 1)[0]
            if base in bb.linears and name.endswith(".weight"):
                continue
            # rewritten norms and biases in the output dtype; everything else exactly as stored
            out[name] = t.to(self.out_dtype).cpu() if not torch.equal(t, original[name]) else stored[name]
        return out, report

    # ------------------------------------------------------------------------------ the end
    def _finish(self, plan: dict) -> None:
        """Complete the partial folder, then rename it to --work-dir: that rename is the commit point (a kill
        before it resumes here, a kill after it leaves only state.json, which a rerun removes)."""
        partial = self.partial
        if not self.state.get("finished"):
            self._complete(plan)
            for f in partial.glob("hidden-*.safetensors"):
                f.unlink()
            self.state["finished"] = True
            write_json_atomically(self.state, partial / STATE_FILE)
        if self.work_dir.exists():
            self.work_dir.rmdir()  # validated empty
        partial.replace(self.work_dir)
        fsync_dir(self.work_dir.parent)
        (self.work_dir / STATE_FILE).unlink()
        fsync_dir(self.work_dir)

    def _complete(self, plan: dict) -> None:
        partial = self.partial
        weight_map = {}
        for fname, names in plan["rest"]:
            weight_map.update({n: fname for n in names})
        for i, fname in enumerate(plan["layers"]):
            with safe_open(str(partial / fname), framework="pt") as f:
                weight_map.update({n: fname for n in f.keys()})
        total = sum((partial / f).stat().st_size for f in set(weight_map.values()))
        write_json_atomically({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                              partial / INDEX_FILE)
        config = json.loads(self.config_bytes)
        quant = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": self.s.w_group_size,
                 "zero_point": True}
        dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[self.out_dtype]
        if self.prefix:
            # LMDeploy's place (llm_config) and the top level, with the vision parts named (spec B1.10 step 5)
            quant["modules_to_not_convert"] = ["vision_model", "mlp1"]
            config["llm_config"]["quantization_config"] = dict(quant)
            config["llm_config"]["torch_dtype"] = dtype_name
        config["quantization_config"] = quant
        config["torch_dtype"] = dtype_name
        if self.smooth_only:
            config.pop("quantization_config")
            config.get("llm_config", {}).pop("quantization_config", None)
        write_text_atomically(json.dumps(config, indent=2, ensure_ascii=False) + "\n", partial / "config.json")
        for f in sorted(self.model.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith((".safetensors", ".bin")):
                copy_file_atomically(f, partial / f.name)
        report = {"settings": asdict(self.s), "backbone": self.backbone.name, "layers": self.state["report"]}
        report["settings"].pop("device")
        write_json_atomically(report, partial / "quant_report.json")


def _read_json(path: Path) -> dict | None:
    """A progress record, or None where it is missing or damaged (the run then starts over)."""
    try:
        return read_json_object(path)
    except JsonFileError:
        return None


def _combine(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _hidden_name(layer: int) -> str:
    return f"hidden-{layer:05d}.safetensors"
