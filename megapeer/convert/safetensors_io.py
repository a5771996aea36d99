"""Sharded safetensors weights of a Hugging Face folder (write and checked read)."""
import json
import os

from .checkpoint_io import ConversionError, few

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def write_weights(tensors: dict, folder: str, max_shard_bytes: int = 2 * 1024 ** 3) -> list:
    """Write tensors as model.safetensors, or numbered shards plus an index. Returns files."""
    from safetensors.torch import save_file
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t.contiguous()
        size += n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX]


def weight_files(folder: str) -> dict:
    """{file: [tensor names]} from the index (or the single file); checks files exist."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        files = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ConversionError(f"{folder}: missing weight shard(s) {', '.join(sorted(missing))} "
                                  f"(listed in {INDEX})")
        return files
    single = os.path.join(folder, SINGLE)
    if os.path.isfile(single):
        return {SINGLE: None}
    raise ConversionError(f"{folder}: no {SINGLE} or {INDEX}")


def read_weights(folder: str, shapes: dict = None) -> dict:
    """All tensors of a folder. With `shapes` (name -> shape) only those names are read and
    each must exist with that shape; tensors not in `shapes` are an error."""
    from safetensors import safe_open
    out = {}
    for file, names in weight_files(folder).items():
        path = os.path.join(folder, file)
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for name in (names if names is not None else sorted(present)):
                    if name not in present:
                        raise ConversionError(f"{path}: tensor {name} is listed in {INDEX} but "
                                              "not stored in this file")
                    out[name] = f.get_tensor(name)
        except ConversionError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad files
            raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None
    if shapes is not None:
        check_tensors(out, shapes, folder)
    return out


def check_tensors(tensors: dict, shapes: dict, where: str):
    missing = [k for k in shapes if k not in tensors]
    extra = [k for k in tensors if k not in shapes]
    if missing:
        raise ConversionError(f"{where}: config.json expects tensors that the weights lack: "
                              f"{few(missing)}")
    if extra:
        raise ConversionError(f"{where}: weights hold tensors that config.json does not "
                              f"describe: {few(extra)}")
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ConversionError(f"{where}: tensor {k} has shape {tuple(tensors[k].shape)} but "
                                  f"config.json implies {tuple(shape)}")

