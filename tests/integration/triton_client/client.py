"""A Triton client of the VideoGen server: the real tritonclient[grpc] from PyPI, unmodified.

Runs in its own virtual environment (tritonclient pins protobuf<7; the server needs >=7), started
by tests/integration/test_triton_compat.py as a subprocess, exactly as an external user's program
would be. It imports nothing from this repository. Usage:

    python client.py COMMAND '{"target": "127.0.0.1:PORT", ...}'

and it prints one JSON object (the last line of stdout). Frames and videos go to files in
`out_dir` (frames as .npy, videos as .mp4), named after the request ids.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import google.protobuf
import numpy as np
import tritonclient
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

try:
    from importlib.metadata import version as _dist_version
except ImportError:  # pragma: no cover
    _dist_version = None

INT32 = {"width", "height", "size", "num_frames", "num_inference_steps", "fps", "motion_bucket_id",
         "decode_chunk_size", "video_fps"}
INT64 = {"seed"}
FP32 = {"noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "guidance"}


def build_inputs(image: bytes, tensors: dict) -> list:
    """The image as BYTES [1] and conditioning values as typed tensors."""
    img = grpcclient.InferInput("image", [1], "BYTES")
    img.set_data_from_numpy(np.array([image], dtype=np.object_))
    inputs = [img]
    for name, value in tensors.items():
        values = value if isinstance(value, list) else [value]
        if name in INT32:
            arr, dt = np.array(values, np.int32), "INT32"
        elif name in INT64:
            arr, dt = np.array(values, np.int64), "INT64"
        elif name in FP32:
            arr, dt = np.array(values, np.float32), "FP32"
        else:  # a deliberately unknown input
            arr, dt = np.array(values, np.int32), "INT32"
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def requested(outputs):
    return None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]


def error_json(e: InferenceServerException) -> dict:
    return {"error": e.message(), "status": e.status()}


def params_json(params) -> dict:
    out = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def save_result(result, out_dir: Path, stem: str) -> dict:
    info = {"outputs": [o.name for o in result.get_response().outputs],
            "parameters": params_json(result.get_response().parameters),
            "id": result.get_response().id, "model_version": result.get_response().model_version}
    frames = result.as_numpy("frames")
    if frames is not None:
        np.save(out_dir / f"{stem}.npy", frames)
        info["frames_shape"] = list(frames.shape)
        info["frames_dtype"] = str(frames.dtype)
    video = result.as_numpy("video")
    if video is not None:
        (out_dir / f"{stem}.mp4").write_bytes(video[0])
        info["video_bytes"] = len(video[0])
    return info


# -- commands ---------------------------------------------------------------------------------------

def cmd_probe(client, args: dict) -> dict:
    """Health, metadata, config, repository index and statistics, as Triton users call them."""
    model = args["model"]
    config = client.get_model_config(model).config
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "model_ready_v1": client.is_model_ready(model, "1"),
        "model_ready_v9": client.is_model_ready(model, "9"),
        "missing_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "config": {
            "name": config.name, "backend": config.backend, "max_batch_size": config.max_batch_size,
            "decoupled": config.model_transaction_policy.decoupled,
            "inputs": [[i.name, grpcclient.model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional]
                       for i in config.input],
            "outputs": [[o.name, grpcclient.model_config_pb2.DataType.Name(o.data_type), list(o.dims)]
                        for o in config.output],
            "instance_group": [[g.count, grpcclient.model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)]
                               for g in config.instance_group],
            "priority_levels": config.dynamic_batching.priority_levels,
            "parameters": {k: v.string_value for k, v in config.parameters.items()},
        },
        "config_json": client.get_model_config(model, as_json=True),
        "index": client.get_model_repository_index(as_json=True),
        "statistics": client.get_inference_statistics(model, as_json=True),
    }


def cmd_infer(client, args: dict) -> dict:
    """Unary infer calls, one after the other; each result saved, each error reported."""
    image = Path(args["image"]).read_bytes()
    out_dir = Path(args["out_dir"])
    results = {}
    for r in args["requests"]:
        try:
            result = client.infer(
                r.get("model", args["model"]), build_inputs(image, r.get("inputs", {})),
                outputs=requested(r.get("outputs")), request_id=r["id"], priority=r.get("priority", 0),
                timeout=r.get("timeout"), parameters=r.get("parameters"))
            results[r["id"]] = save_result(result, out_dir, r["id"])
        except InferenceServerException as e:
            results[r["id"]] = error_json(e)
    return {"results": results}


def cmd_stream(client, args: dict) -> dict:
    """Decoupled streaming: a failing request first, then the rest once its error is back (the
    stream must stay open), every frame and final response collected, then stop_stream()."""
    image = Path(args["image"]).read_bytes()
    out_dir = Path(args["out_dir"])
    lock = threading.Condition()
    responses, errors = [], []

    def callback(result, error):
        with lock:
            if error is not None:
                errors.append(error_json(error))
            else:
                responses.append(result)
            lock.notify_all()

    def wait(predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        with lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("stream responses did not arrive")
                lock.wait(left)

    def finals():
        return sum(bool(params_json(r.get_response().parameters).get("triton_final_response")) for r in responses)

    client.start_stream(callback=callback)
    for r in args["failing"]:
        client.async_stream_infer(args["model"], build_inputs(image, r.get("inputs", {})), request_id=r["id"],
                                  parameters=r.get("parameters"), outputs=requested(r.get("outputs")))
    wait(lambda: len(errors) == len(args["failing"]))
    for r in args["requests"]:  # sent together: they run concurrently, responses interleave
        client.async_stream_infer(args["model"], build_inputs(image, r.get("inputs", {})), request_id=r["id"],
                                  parameters=r.get("parameters"), outputs=requested(r.get("outputs")),
                                  priority=r.get("priority", 0))
    wait(lambda: finals() == len(args["requests"]))
    client.stop_stream()

    per_request: dict = {}
    for result in responses:
        resp = result.get_response()
        entry = per_request.setdefault(resp.id, {"frames": {}, "final": None, "order": []})
        params = params_json(resp.parameters)
        if params.get("triton_final_response"):
            entry["order"].append("final")
            entry["final"] = save_result(result, out_dir, f"{resp.id}-final")
        else:
            frame = result.as_numpy("frames")
            entry["order"].append(params["frame_index"])
            entry["frames"][params["frame_index"]] = (list(frame.shape), str(frame.dtype))
            np.save(out_dir / f"{resp.id}-frame{params['frame_index']}.npy", frame)
    return {"errors": errors, "requests": per_request}


def cmd_cancel(client, args: dict) -> dict:
    """Start a long request on a stream; when told (stdin), send a unary request with a 1 ms queue
    timeout behind it, then stop_stream(cancel_requests=True) while the long one still runs."""
    image = Path(args["image"]).read_bytes()
    got = []
    client.start_stream(callback=lambda result, error: got.append(error_json(error) if error else "result"))
    client.async_stream_infer(args["model"], build_inputs(image, args["long"]), request_id="long")
    print("sent", flush=True)
    sys.stdin.readline()  # the test saw the request running on the server
    queued = {}
    try:
        client.infer(args["model"], build_inputs(image, {"num_frames": 1, "num_inference_steps": 1}),
                     request_id="queued", timeout=1000)
        queued = {"result": "unexpected success"}
    except InferenceServerException as e:
        queued = error_json(e)
    t0 = time.monotonic()
    client.stop_stream(cancel_requests=True)
    return {"stop_seconds": time.monotonic() - t0, "stream_callbacks": got, "queued": queued}


def cmd_repository(client, args: dict) -> dict:
    """Model control: load and unload a model that is not loaded at start."""
    model = args["model"]
    out = {"ready_before": client.is_model_ready(model)}
    client.load_model(model)
    out["ready_after_load"] = client.is_model_ready(model)
    out["index_after_load"] = client.get_model_repository_index(as_json=True)
    out["stats_after_load"] = client.get_inference_statistics(model, as_json=True)
    try:
        client.load_model(model, config=json.dumps({"max_batch_size": 4}))
        out["config_override"] = "unexpected success"
    except InferenceServerException as e:
        out["config_override"] = error_json(e)
    client.unload_model(model)
    out["ready_after_unload"] = client.is_model_ready(model)
    out["index_after_unload"] = client.get_model_repository_index(as_json=True)
    try:
        client.get_model_metadata("no-such-model")
        out["missing_metadata"] = "unexpected success"
    except InferenceServerException as e:
        out["missing_metadata"] = error_json(e)
    try:  # in the repository, no version loaded: Triton's "has no available versions"
        client.get_model_metadata(model)
        out["unloaded_metadata"] = "unexpected success"
    except InferenceServerException as e:
        out["unloaded_metadata"] = error_json(e)
    return out


def cmd_statistics(client, args: dict) -> dict:
    return {"statistics": client.get_inference_statistics(args.get("model", ""), as_json=True)}


def cmd_descriptors(client, args: dict) -> dict:
    """Check our protocol definition (a FileDescriptorSet from the server's build) against the one
    that ships in tritonclient: every message, field, enum value and method of ours must exist
    there with the same number, type, label and streaming."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    theirs = {}
    for mod in (service_pb2, model_config_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        theirs[fdp.package] = theirs.get(fdp.package, []) + [fdp]

    def index(files):
        messages, enums, methods = {}, {}, {}

        def walk(prefix, msg):
            name = f"{prefix}.{msg.name}"
            messages[name] = {f.name: (f.number, f.type, f.label, f.type_name, f.HasField("oneof_index"))
                              for f in msg.field}
            for e in msg.enum_type:
                enums[f"{name}.{e.name}"] = {v.name: v.number for v in e.value}
            for n in msg.nested_type:
                walk(name, n)

        for fdp in files:
            for m in fdp.message_type:
                walk(f".{fdp.package}", m)
            for e in fdp.enum_type:
                enums[f".{fdp.package}.{e.name}"] = {v.name: v.number for v in e.value}
            for s in fdp.service:
                for m in s.method:
                    methods[f".{fdp.package}.{s.name}/{m.name}"] = (m.input_type, m.output_type,
                                                                    m.client_streaming, m.server_streaming)
        return messages, enums, methods

    ours_set = descriptor_pb2.FileDescriptorSet.FromString(Path(args["descriptors"]).read_bytes())
    o_msgs, o_enums, o_methods = index(list(ours_set.file))
    t_msgs, t_enums, t_methods = index([f for files in theirs.values() for f in files])
    problems = []
    for name, fields in o_msgs.items():
        if name not in t_msgs:
            problems.append(f"message {name} not in Triton's protocol")
            continue
        for fname, spec in fields.items():
            if t_msgs[name].get(fname) != spec:
                problems.append(f"{name}.{fname}: ours {spec}, Triton's {t_msgs[name].get(fname)}")
    for name, values in o_enums.items():
        for v, n in values.items():
            if t_enums.get(name, {}).get(v) != n:
                problems.append(f"enum {name}.{v} = {n}: Triton's {t_enums.get(name, {}).get(v)}")
    for name, spec in o_methods.items():
        if t_methods.get(name) != spec:
            problems.append(f"rpc {name}: ours {spec}, Triton's {t_methods.get(name)}")
    return {"problems": problems, "messages": len(o_msgs), "methods": sorted(o_methods)}


COMMANDS = {"probe": cmd_probe, "infer": cmd_infer, "stream": cmd_stream, "cancel": cmd_cancel,
            "repository": cmd_repository, "statistics": cmd_statistics, "descriptors": cmd_descriptors}


def main() -> None:
    command, args = sys.argv[1], json.loads(sys.argv[2])
    with grpcclient.InferenceServerClient(args.get("target", "127.0.0.1:1")) as client:
        out = COMMANDS[command](client, args)
    out["versions"] = {
        "protobuf": google.protobuf.__version__,
        "tritonclient": _dist_version("tritonclient") if _dist_version else getattr(tritonclient, "__version__", ""),
        "python": sys.executable,
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
