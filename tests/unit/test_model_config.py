"""config.pbtxt parsing: good configs become typed settings; each bad one names file, field, problem."""
from __future__ import annotations

from pathlib import Path

import pytest

from videogen_server.engine import repository
from videogen_server.engine.model_config import VersionPolicy
from videogen_server.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "m", versions=(1,)) -> Path:
    model = tmp_path / name
    for v in versions:
        (model / str(v)).mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return model


FULL = '''
name: "m"
backend: "svd"
max_batch_size: 4
version_policy: { specific: { versions: [1, 2] } }
instance_group [ { count: 2, kind: KIND_GPU, gpus: [0, 1] }, { kind: KIND_CPU } ]
dynamic_batching {
  max_queue_delay_microseconds: 50000
  preferred_batch_size: [2, 4]
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { max_queue_size: 10 default_timeout_microseconds: 2500000 allow_timeout_override: true }
}
parameters { key: "dtype" value { string_value: "bfloat16" } }
parameters { key: "compile" value { string_value: "max-autotune" } }
parameters { key: "channels_last" value { string_value: "true" } }
parameters { key: "default_num_inference_steps" value { string_value: "30" } }
parameters { key: "default_noise_aug_strength" value { string_value: "0.05" } }
parameters { key: "max_width" value { string_value: "1280" } }
model_warmup [ { name: "xt", inputs { key: "num_frames" value: "25" } count: 2 } ]
'''


def test_full_config(tmp_path):
    s = repository.read_settings(write(tmp_path, FULL, versions=(1, 2, 3)))
    assert (s.name, s.backend, s.max_batch_size) == ("m", "svd", 4)
    assert s.version_policy == VersionPolicy(kind="specific", versions=(1, 2))
    assert s.version_policy.select([1, 2, 3]) == [2, 1]
    assert [(g.kind, g.count, g.gpus) for g in s.instance_groups] == [("gpu", 2, (0, 1)), ("cpu", 1, ())]
    b = s.batching
    assert b.enabled and b.max_queue_delay_s == 0.05 and b.preferred_batch_sizes == (2, 4)
    assert (b.priority_levels, b.default_priority_level) == (3, 2)
    assert b.queue_policy.max_queue_size == 10 and b.queue_policy.default_timeout_s == 2.5
    assert b.queue_policy.allow_timeout_override
    assert dict(s.parameters) == {"dtype": "bfloat16", "compile": "max-autotune", "channels_last": "true"}
    assert s.defaults.num_inference_steps == 30 and s.defaults.noise_aug_strength == 0.05
    assert s.limits.max_width == 1280
    assert s.warmup[0].inputs == {"num_frames": "25"} and s.warmup[0].count == 2


def test_minimal_config_takes_diffusers_defaults(tmp_path):
    s = repository.read_settings(write(tmp_path, 'backend: "svd"'))
    assert s.name == "m" and s.max_batch_size == 1 and not s.batching.enabled
    assert s.defaults.width == 1024 and s.defaults.height == 576 and s.defaults.num_inference_steps == 25
    assert (s.defaults.fps, s.defaults.motion_bucket_id, s.defaults.noise_aug_strength) == (7, 127, 0.02)
    assert (s.defaults.min_guidance_scale, s.defaults.max_guidance_scale) == (1.0, 3.0)
    assert s.version_policy.select([1, 5, 3]) == [5]
    assert [(g.kind, g.count) for g in s.instance_groups] == [("auto", 1)]


def test_num_frames_default_comes_from_the_unet(tmp_path):
    model = write(tmp_path, 'backend: "svd"')
    (model / "1" / "unet").mkdir()
    (model / "1" / "unet" / "config.json").write_text('{"num_frames": 14}')
    assert repository.read_settings(model).defaults.num_frames == 14


def test_num_frames_default_comes_from_the_version_served(tmp_path):
    """Version 1 holds SVD (14 frames), version 2 SVD-XT (25): a policy serving version 1 defaults to
    14 frames (it took the highest folder on disk's 25, running SVD past its trained length)."""
    model = write(tmp_path, 'backend: "svd" version_policy { specific { versions: [1] } }', versions=(1, 2))
    for version, frames in ((1, 14), (2, 25)):
        (model / str(version) / "unet").mkdir()
        (model / str(version) / "unet" / "config.json").write_text(f'{{"num_frames": {frames}}}')
    s = repository.read_settings(model)
    assert s.defaults.num_frames == 14
    latest = write(tmp_path / "latest", 'backend: "svd"', versions=(1, 2))
    for version, frames in ((1, 14), (2, 25)):
        (latest / str(version) / "unet").mkdir()
        (latest / str(version) / "unet" / "config.json").write_text(f'{{"num_frames": {frames}}}')
    assert repository.read_settings(latest).defaults.num_frames == 25


BAD = [
    ('backend: "svd" max_batch_size: ', "config.pbtxt", "not valid ModelConfig text format"),
    ('backend: "svd" no_such_field: 1', "config.pbtxt", "no_such_field"),
    ('name: "other" backend: "svd"', "name", "must equal the model's folder name"),
    ('name: "m"', "backend", "required"),
    ('backend: "tensorrt"', "backend", "unknown backend 'tensorrt'"),
    ('backend: "svd" max_batch_size: -2', "max_batch_size", "must be >= 0"),
    ('backend: "svd" version_policy: { specific: {} }', "version_policy.specific.versions", "one or more"),
    ('backend: "svd" instance_group [ { count: -1 } ]', "instance_group[0].count", ">= 1"),
    ('backend: "svd" instance_group [ { kind: KIND_CPU, gpus: [0] } ]', "instance_group[0].gpus", "KIND_CPU"),
    ('backend: "svd" max_batch_size: 2 dynamic_batching { preferred_batch_size: [4] }',
     "dynamic_batching.preferred_batch_size", "outside 1..max_batch_size"),
    ('backend: "svd" dynamic_batching { priority_levels: 2 default_priority_level: 3 }',
     "dynamic_batching.default_priority_level", "1..2"),
    ('backend: "svd" dynamic_batching { default_queue_policy { timeout_action: DELAY } }',
     "dynamic_batching.default_queue_policy.timeout_action", "only REJECT"),
    ('backend: "svd" parameters { key: "dtype" value { string_value: "float8" } }', "parameters", "dtype"),
    ('backend: "svd" parameters { key: "compiel" value { string_value: "none" } }', "parameters", "compiel: unknown"),
    ('backend: "svd" parameters { key: "cpu_offload" value { string_value: "maybe" } }', "parameters", "not a boolean"),
    ('backend: "svd" parameters { key: "fp8" value { string_value: "e4m3" } }', "parameters",
     "fp8: 'e4m3' is not true, false, dynamic or static"),
    ('backend: "svd" parameters { key: "forward_chunking" value { string_value: "-3" } }', "parameters",
     "forward_chunking: expected true, false or a number of tokens per block of at least 1024"),
    ('backend: "svd" parameters { key: "forward_chunking" value { string_value: "8" } }', "parameters",
     "forward_chunking: expected true, false or a number of tokens per block of at least 1024, got '8'"),
    ('backend: "svd" parameters { key: "compile_vae" value { string_value: "fast" } }', "parameters", "compile_vae: 'fast'"),
    ('backend: "svd" parameters { key: "compile_options" value { string_value: "max_autotune" } }', "parameters",
     "compile_options: 'max_autotune' is not key=value"),
    ('backend: "svd" parameters { key: "compile_vae_options" value { string_value: "a=1;b" } }', "parameters",
     "compile_vae_options: 'b' is not key=value"),
    ('backend: "svd" parameters { key: "attention_backend" value { string_value: "fa3" } }', "parameters",
     "attention_backend: 'fa3' is not one of"),
    ('backend: "svd" parameters [ { key: "cpu_offload" value { string_value: "true" } }, '
     '{ key: "compile" value { string_value: "reduce-overhead" } } ]', "parameters",
     "compile: 'reduce-overhead' records CUDA graphs, which cannot be combined with cpu_offload"),
    ('backend: "svd" parameters [ { key: "cpu_offload" value { string_value: "true" } }, '
     '{ key: "compile" value { string_value: "default" } }, '
     '{ key: "compile_options" value { string_value: "triton.cudagraphs=true" } } ]', "parameters",
     "compile_options: triton.cudagraphs cannot be combined with cpu_offload"),
    ('backend: "svd" parameters { key: "default_width" value { string_value: "wide" } }', "parameters['default_width']",
     "not a number"),
    ('backend: "svd" parameters { key: "default_width" value { string_value: "1020" } }', "parameters['default_width']",
     "multiple of 8"),
    ('backend: "svd" parameters { key: "default_num_frames" value { string_value: "40" } }',
     "parameters['default_num_frames']", "max_num_frames"),
    # every default by the rules a request's value meets (else READY, and every request refused)
    ('backend: "svd" parameters { key: "default_fps" value { string_value: "0" } }', "parameters['default_fps']",
     "0 is outside 1..240"),
    ('backend: "svd" parameters { key: "default_motion_bucket_id" value { string_value: "5000" } }',
     "parameters['default_motion_bucket_id']", "outside 0..1023"),
    ('backend: "svd" parameters { key: "default_min_guidance_scale" value { string_value: "5" } }',
     "parameters['default_min_guidance_scale']", "above max_guidance_scale 3.0"),
    ('backend: "svd" parameters { key: "default_noise_aug_strength" value { string_value: "nan" } }',
     "parameters['default_noise_aug_strength']", ""),
    ('backend: "svd" parameters { key: "default_jpeg_quality" value { string_value: "0" } }',
     "parameters['default_jpeg_quality']", "outside 1..100"),
    ('backend: "svd" model_warmup [ { inputs { key: "frames" value: "2" } } ]', "model_warmup[0].inputs", "unknown keys"),
    # each warm-up value as a request's: they failed every version's load, naming neither file nor field
    ('backend: "svd" model_warmup [ { inputs { key: "width" value: "wide" } } ]', "model_warmup[0].inputs['width']",
     "'wide' is not a number"),
    ('backend: "svd" model_warmup [ { name: "a" }, { inputs { key: "width" value: "260" } } ]',
     "model_warmup[1].inputs['width']", "multiple of 8"),
    # a queue per level, walked for each request: 10**9 took seconds and gigabytes on the event loop
    ('backend: "svd" dynamic_batching { priority_levels: 1000000000 default_priority_level: 1 }',
     "dynamic_batching.priority_levels", "1000000000 is above 1024"),
    ('backend: "svd" parameters [ { key: "max_decode_chunk_size" value { string_value: "4" } }, '
     '{ key: "default_decode_chunk_size" value { string_value: "8" } } ]', "parameters['default_decode_chunk_size']",
     "at most max_decode_chunk_size"),
    # above Pillow's own bomb limit (~89.5 M), images under the model's limit were refused as bombs
    ('backend: "svd" parameters { key: "max_image_pixels" value { string_value: "150000000" } }',
     "parameters['max_image_pixels']", "150000000 is above 89478485, the most Pillow decodes"),
]


@pytest.mark.parametrize("text,field,reason", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_config_names_file_field_and_problem(tmp_path, text, field, reason):
    model = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        repository.read_settings(model)
    assert err.value.path == str(model / "config.pbtxt")
    assert err.value.field == field
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{model / 'config.pbtxt'}: {field}: ")


def test_scan_finds_models_and_versions(tmp_path):
    write(tmp_path, 'backend: "svd"', name="a", versions=(1, 10, 2))
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "a" / "notes").mkdir()
    found = repository.scan((tmp_path,))
    assert list(found) == ["a"]
    assert repository.versions_on_disk(found["a"]) == [1, 2, 10]
    with pytest.raises(ConfigError):
        repository.scan((tmp_path / "missing",))


def test_fingerprint_changes_with_files(tmp_path):
    model = write(tmp_path, 'backend: "svd"')
    before = repository.fingerprint(model)
    (model / "1" / "weights.safetensors").write_bytes(b"x")
    assert repository.fingerprint(model) != before


def test_fingerprint_sees_a_file_renamed_over_one_of_the_same_size_and_mtime(tmp_path):
    """`tar x`, `cp -p` and `rsync -t` give a file its source's mtime (tar: whole seconds): a new
    config.pbtxt or weights file of the same size renamed over the old one was not a change (repository
    review). Its inode and ctime are new."""
    import os

    model = write(tmp_path, 'backend: "svd"\nmax_batch_size: 2')
    (model / "1" / "w.safetensors").write_bytes(b"x" * 10)
    for path, new in ((model / "config.pbtxt", 'backend: "svd"\nmax_batch_size: 4'), (model / "1" / "w.safetensors", b"y" * 10)):
        os.utime(path, (1_700_000_000, 1_700_000_000))
        before = repository.fingerprint(model)
        staged = tmp_path / "staged"
        staged.write_text(new) if isinstance(new, str) else staged.write_bytes(new)
        assert staged.stat().st_size == path.stat().st_size
        os.utime(staged, (1_700_000_000, 1_700_000_000))  # as extracted from an archive made that second
        os.replace(staged, path)
        assert repository.fingerprint(model) != before, path.name


def test_fingerprint_ignores_compile_artifacts(tmp_path):
    """A `videogen-server compile-artifacts` job writes them beside the weights while servers in poll mode
    watch the repository: a reload for each (a recompile of a full-size model) would be the cost."""
    model = write(tmp_path, 'backend: "svd"')
    (model / "1" / "unet").mkdir()
    before = repository.fingerprint(model)
    (model / "1" / "compile_artifacts").mkdir()
    (model / "1" / "compile_artifacts" / "torch-2.11.0-py312-NVIDIA-H200-sm90.bin").write_bytes(b"x")
    assert repository.fingerprint(model) == before
    (model / "1" / "unet" / "compile_artifacts").write_bytes(b"x")  # the name elsewhere is model content
    assert repository.fingerprint(model) != before


def test_fingerprint_sees_each_version_apart_and_nothing_outside_them(tmp_path):
    """Poll mode reloads what changed: a staging folder for the next version or a note beside the
    versions reloaded every served version (a recompile each, on a GPU), once per file written."""
    model = write(tmp_path, 'backend: "svd"', versions=(1, 2))
    (model / "1" / "w.safetensors").write_bytes(b"x")
    before = repository.fingerprint(model)
    (model / ".staging-v3").mkdir()
    (model / ".staging-v3" / "w.safetensors").write_bytes(b"y")
    (model / "NOTES.md").write_text("v3 next week")
    (model / "03").mkdir()  # not a version folder: `3` is one
    assert repository.fingerprint(model) == before
    (model / "2" / "w.safetensors").write_bytes(b"z")
    after = repository.fingerprint(model)
    assert after.version(1) == before.version(1) and after.version(2) != before.version(2)
    assert after.config == before.config
    (model / "config.pbtxt").write_text('backend: "svd" max_batch_size: 2')
    assert repository.fingerprint(model).config != after.config


def test_fingerprint_follows_symlinked_versions_and_their_swaps(tmp_path):
    """A version folder that is a symlink (git-sync and many deploy tools swap one atomically) was not
    looked into: adding one or swapping its target changed nothing, and the old weights kept serving."""
    import os

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.pbtxt").write_text('backend: "svd"')
    for name, data in (("w1", b"one"), ("w2", b"two")):
        (tmp_path / "store" / name).mkdir(parents=True)
        (tmp_path / "store" / name / "w.safetensors").write_bytes(data)
    (model / "1").symlink_to(tmp_path / "store" / "w1")
    first = repository.fingerprint(model)
    assert repository.versions_on_disk(model) == [1] and first.version(1) is not None
    (model / "1.new").symlink_to(tmp_path / "store" / "w2")
    os.replace(model / "1.new", model / "1")  # the atomic swap
    assert repository.fingerprint(model).version(1) != first.version(1)
    (tmp_path / "store" / "w2" / "loop").symlink_to(tmp_path / "store" / "w2")  # walked once, no hang
    (tmp_path / "store" / "w2" / ".#README.md").symlink_to("root@host.1234")  # an editor's lock: dangling
    (tmp_path / "store" / "w2" / "self").symlink_to(tmp_path / "store" / "w2" / "self")  # a link to itself
    assert repository.fingerprint(model).version(1) is not None  # (they stopped the model loading)


def test_fingerprint_sees_a_weights_file_made_readable(tmp_path):
    """save_pretrained writes 0600 files: a version that failed for it, fixed with chmod, was never
    reloaded (size and time alone did not change)."""
    model = write(tmp_path, 'backend: "svd"')
    weights = model / "1" / "w.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    before = repository.fingerprint(model)
    weights.chmod(0o644)
    assert repository.fingerprint(model) != before


def test_versions_are_folders_named_as_the_number(tmp_path):
    """`0002` counted as version 2 and was loaded from `2`, which does not exist: the model failed."""
    model = write(tmp_path, 'backend: "svd"', versions=(1,))
    for name in ("0002", "+3", "04", "0"):
        (model / name).mkdir()
    assert repository.versions_on_disk(model) == [1]


def test_a_folder_that_cannot_be_read_stops_no_other_model(tmp_path, monkeypatch):
    """One unreadable folder (a volume's root-owned lost+found, a chmod 000) raised out of the scan:
    the server could not start, and a poll saw no change to any model. (Tests run as root, whom
    permissions do not stop, so the error is raised by hand here.)"""
    write(tmp_path, 'backend: "svd"', name="a")
    write(tmp_path, 'backend: "svd"', name="b")
    import os

    original = os.stat

    def stat(path, *args, **kwargs):
        if Path(path).parent.name == "a":
            raise PermissionError(13, "Permission denied")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    unreadable: dict[str, str] = {}
    assert list(repository.scan((tmp_path,), unreadable)) == ["b"]
    assert list(unreadable) == ["a"] and "Permission denied" in unreadable["a"]


def test_warmup_seed_is_fixed_and_taken_when_given(tmp_path):
    from types import SimpleNamespace

    from videogen_server.engine.engine import ModelRuntime

    s = repository.read_settings(write(tmp_path, 'backend: "svd" max_batch_size: 2 model_warmup [ '
                                       '{ name: "a", inputs { key: "num_frames" value: "5" } count: 2 }, '
                                       '{ name: "b", inputs { key: "seed" value: "123" } batch_size: 2 } ]'))
    batches = ModelRuntime._warmup_inputs(SimpleNamespace(settings=s))
    assert [(name, p.seed, p.num_frames, n) for name, p, n in batches] == [
        ("warmup-a-0", 0, 5, 1), ("warmup-a-1", 0, 5, 1), ("warmup-b-0", 123, s.defaults.num_frames, 2)]


@pytest.mark.parametrize("params, chunk, limit", [
    ("", 25, 25),  # every frame in one VAE call
    ('parameters { key: "max_decode_chunk_size" value { string_value: "8" } }', 8, 8),
    ('parameters { key: "max_decode_chunk_size" value { string_value: "8" } } '
     'parameters { key: "default_decode_chunk_size" value { string_value: "4" } }', 4, 8),
    ('parameters { key: "default_num_frames" value { string_value: "4" } } '
     'parameters { key: "default_decode_chunk_size" value { string_value: "8" } }', 4, 25),  # never above the frames
])
def test_get_model_reports_the_decode_chunk_a_request_gets(tmp_path, params, chunk, limit):
    from videogen_server.engine.admission import resolve_params
    from videogen_server.domain import GenerationParams
    from videogen_server.transport.convert import defaults_to_pb, limits_to_pb

    s = repository.read_settings(write(tmp_path, f'backend: "svd" {params}'))
    assert resolve_params(GenerationParams(), s.defaults, s.limits).decode_chunk_size == chunk
    assert defaults_to_pb(s.defaults, s.limits).decode_chunk_size == chunk
    assert limits_to_pb(s.limits).max_decode_chunk_size == limit


def test_instance_groups_resolve_as_triton_normalises_them():
    """KIND_AUTO is a GPU group where a GPU is visible, else a CPU one; a GPU group without `gpus` takes
    every visible GPU; a GPU that is not there names the group's field."""
    from videogen_server.engine.model_config import InstanceGroup, resolve_instance_groups

    groups = (InstanceGroup("auto", 2), InstanceGroup("gpu", 1, (1,)), InstanceGroup("cpu", 3))
    assert resolve_instance_groups(groups, 2) == (
        InstanceGroup("gpu", 2, (0, 1)), InstanceGroup("gpu", 1, (1,)), InstanceGroup("cpu", 3))
    assert resolve_instance_groups(groups[:1] + groups[2:], 0) == (InstanceGroup("cpu", 2), InstanceGroup("cpu", 3))
    for groups, visible, field in (((InstanceGroup("gpu", 1),), 0, "instance_group[0].gpus"),
                                   ((InstanceGroup("cpu", 1), InstanceGroup("gpu", 1, (0, 2))), 2,
                                    "instance_group[1].gpus")):
        with pytest.raises(ConfigError) as err:
            resolve_instance_groups(groups, visible, "m/config.pbtxt")
        assert err.value.field == field and err.value.path == "m/config.pbtxt"
