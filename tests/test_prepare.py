"""The prepare stage on the demo corpus: outcomes per input, counts, determinism, shards, S3."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from mambastyle.data.demo import demo_files, demo_inputs
from mambastyle.data.faces import PrepareConfig
from mambastyle.data.inputs import make_key, split_of
from mambastyle.data.prepare import inputs_from_source, prepare
from mambastyle.data.shards import register_webdataset_s3, shard_urls, verify
from mambastyle.storage import StorageOptions, list_versions, resolve, write_bytes

CONFIG = PrepareConfig(output_size=32, min_face_size=80, shard_max_samples=8)

EXPECTED_QUARANTINE = {
    "demo://bad/empty.jpg": "empty_file",
    "demo://bad/truncated.jpg": "decode_error",
    "demo://bad/notes.txt": "not_an_image",
    "demo://bad/bomb.png": "too_large",
    "demo://bad/cat.jpg": "no_face",
    "demo://bad/coffee.jpg": "no_face",
    "demo://bad/small_face.jpg": "too_small",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    manifest = prepare(demo_inputs(), resolve(str(out)), CONFIG, workers=2)
    return out, manifest


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_input_has_its_documented_outcome(demo_run):
    out, manifest = demo_run
    c = manifest["counts"]
    assert c["inputs"] == len(demo_files()) == c["written"] + c["quarantined"]
    quarantine = {q["source"]: q["reason"] for q in read_jsonl(out / "shards" / "quarantine.jsonl")}
    assert quarantine == EXPECTED_QUARANTINE
    assert c["quarantine_reasons"] == {
        r: list(EXPECTED_QUARANTINE.values()).count(r) for r in set(EXPECTED_QUARANTINE.values())
    }
    # every other input (variations, RGBA, CMYK, 16-bit, gray, EXIF-rotated, two people): one sample
    assert c["samples"] == c["written"] == len(demo_files()) - len(EXPECTED_QUARANTINE)
    assert sum(s["samples"] for s in manifest["shards"]) == c["samples"]
    assert sum(v["samples"] for v in manifest["splits"].values()) == c["samples"]


def test_shards_are_webdataset_readable_with_metadata(demo_run):
    out, manifest = demo_run
    urls = [str(out / "shards" / e["path"]) for e in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == manifest["counts"]["samples"]
    sources = {}
    for s in samples:
        assert s["png"].size == (32, 32) and s["png"].mode == "RGB"
        meta = s["json"]
        assert meta["key"] == s["__key__"] and "." not in s["__key__"]
        assert meta["split"] == split_of(meta["key"], CONFIG.split)
        assert len(meta["landmarks"]) == 68 and len(meta["quad"]) == 4
        assert {"yaw", "pitch", "roll", "detector_score", "original_size", "source"} <= set(meta)
        sources[meta["source"]] = meta
    exif = sources["demo://grace_hopper/exif_rotated.jpg"]
    assert exif["oriented_size"] == exif["original_size"][::-1]  # EXIF orientation honoured
    # members of a sample are adjacent in the tar
    for url in urls:
        names = tarfile.open(url).getnames()
        assert [n.rsplit(".", 1)[0] for n in names[0::2]] == [n.rsplit(".", 1)[0] for n in names[1::2]]


def test_rerun_is_byte_identical_and_drops_stale_shards(demo_run, tmp_path):
    out, manifest = demo_run
    second = tmp_path / "again"
    (second / "shards" / "train").mkdir(parents=True)
    (second / "shards" / "train" / "train-000099.tar").write_bytes(b"left over from an older run")
    again = prepare(demo_inputs(), resolve(str(second)), CONFIG, workers=1)
    assert again == manifest  # the manifest names shards relative to itself: location-independent
    for e in manifest["shards"]:
        assert (second / "shards" / e["path"]).read_bytes() == (out / "shards" / e["path"]).read_bytes()
    assert not (second / "shards" / "train" / "train-000099.tar").exists()
    # same location again: the manifest file itself is byte-identical
    before = (second / "shards" / "manifest.json").read_bytes()
    prepare(demo_inputs(), resolve(str(second)), CONFIG, workers=1)
    assert (second / "shards" / "manifest.json").read_bytes() == before


def test_multi_face_policies():
    refs = [r for r in demo_inputs() if r.uri == "demo://group/two_people.jpg"]
    from mambastyle.data.faces import process_input

    assert len(process_input(refs[0], CONFIG).samples) == 1
    each = process_input(refs[0], dataclasses.replace(CONFIG, multi_face="each")).samples
    assert [s.key for s in each] == [f"{refs[0].key}_f0", f"{refs[0].key}_f1"]
    rejected = process_input(refs[0], dataclasses.replace(CONFIG, multi_face="reject"))
    assert rejected.reason == "multiple_faces" and not rejected.samples


def test_verify_finds_a_corrupted_shard(demo_run, tmp_path):
    import shutil

    out, manifest = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert verify(resolve(str(copy))) == []
    victim = copy / "shards" / manifest["shards"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    (copy / "shards" / manifest["shards"][-1]["path"]).unlink()
    problems = verify(resolve(str(copy)))
    assert len(problems) == 2
    assert "sha256 mismatch" in problems[0] and "missing" in problems[1]


def test_keys_are_stable_and_dot_free():
    assert make_key("a/b.c.jpg") == make_key("a/b.c.jpg")
    assert "." not in make_key("x/y.tar.gz") and make_key("a/b.jpg") != make_key("a/b.png")


def test_folder_source_and_s3_output_end_to_end(s3, tmp_path):
    endpoint, bucket = s3
    files = demo_files()
    chosen = ["grace_hopper/original.jpg", "astronaut/flip.png", "bad/notes.txt", "bad/cat.jpg"]
    for name in chosen:
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(files[name])
    opts = StorageOptions(endpoint_url=endpoint)
    refs = inputs_from_source(str(tmp_path / "photos"), opts)
    assert len(refs) == 4
    out = resolve(f"s3://{bucket}/run1", opts)
    manifest = prepare(refs, out, CONFIG)
    assert manifest["counts"] == {**manifest["counts"], "inputs": 4, "written": 2, "quarantined": 2}
    assert all(u.startswith(f"s3://{bucket}/run1/shards/") for u in shard_urls(out))
    assert verify(out) == []
    # read the shards back from S3 with webdataset, through the storage module's filesystem
    register_webdataset_s3(opts)
    urls = shard_urls(out)
    assert urls == [f"s3://{bucket}/run1/shards/{e['path']}" for e in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 2
    assert all(Image.open(io.BytesIO(s["png"])).size == (32, 32) for s in samples)
    # an S3 prefix works as a source too
    for name in chosen[:2]:
        write_bytes(resolve(f"s3://{bucket}/inbox/{name}", opts), files[name])
    s3_refs = inputs_from_source(f"s3://{bucket}/inbox", opts)
    assert [r.uri for r in s3_refs] == [f"s3://{bucket}/inbox/{n}" for n in sorted(chosen[:2])]
    assert prepare(s3_refs, resolve(f"s3://{bucket}/run2", opts), CONFIG)["counts"]["written"] == 2


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files"):
        inputs_from_source(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_ray_data_reads_the_shards_from_s3(s3, tmp_path):
    import ray

    endpoint, bucket = s3
    opts = StorageOptions(endpoint_url=endpoint)
    refs = [
        r
        for r in demo_inputs()
        if r.uri in ("demo://grace_hopper/original.jpg", "demo://astronaut/original.jpg")
    ]
    out = resolve(f"s3://{bucket}/ray", opts)
    manifest = prepare(refs, out, CONFIG)
    ray.init(num_cpus=1, include_dashboard=False, address="local", log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(shard_urls(out), filesystem=out.fs).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == manifest["counts"]["samples"] == 2
    assert sorted(r["__key__"] for r in rows) == sorted(r.key for r in refs)
    assert all(r["png"].shape == (32, 32, 3) for r in rows)


def test_interrupted_runs_leave_a_valid_dataset_or_none_and_reruns_are_identical(
    demo_run, tmp_path, monkeypatch
):
    import mambastyle.data.prepare as prep
    import mambastyle.data.shards as shards

    out, manifest = demo_run
    refs = sorted(demo_inputs(), key=lambda r: r.key)
    real_write = prep.write_bytes

    def interrupted(target, inputs) -> None:
        written = []

        def crash_after_first_shard(loc, data, **kwargs):
            if loc.path.endswith(".tar") and written:
                raise KeyboardInterrupt("simulated kill")
            written.append(loc.path)
            real_write(loc, data, **kwargs)

        for module in (prep, shards):  # saved work units and shards
            monkeypatch.setattr(module, "write_bytes", crash_after_first_shard)
        with pytest.raises(KeyboardInterrupt):
            prepare(inputs, resolve(str(target)), CONFIG, workers=1)
        for module in (prep, shards):
            monkeypatch.setattr(module, "write_bytes", real_write)

    # a full run over an earlier one made with other settings: no manifest while shards change
    target = tmp_path / "interrupted"
    prepare(refs, resolve(str(target)), dataclasses.replace(CONFIG, output_size=16), workers=1)
    interrupted(target, refs)
    assert not (target / "shards" / "manifest.json").exists()  # nothing half-done is committed
    again = prepare(refs, resolve(str(target)), CONFIG, workers=1)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in manifest["shards"]]
    assert verify(resolve(str(target))) == []
    # an incremental run: the earlier dataset stays committed and valid throughout
    grown = tmp_path / "grown"
    prepare(refs[:-8], resolve(str(grown)), CONFIG, workers=1)
    before = (grown / "shards" / "manifest.json").read_bytes()
    interrupted(grown, refs)
    assert (grown / "shards" / "manifest.json").read_bytes() == before and verify(resolve(str(grown))) == []
    after = prepare(refs, resolve(str(grown)), CONFIG, workers=1)
    reference = tmp_path / "reference"  # the same growth, uninterrupted
    prepare(refs[:-8], resolve(str(reference)), CONFIG, workers=1)
    assert prepare(refs, resolve(str(reference)), CONFIG, workers=1) == after
    tars = {p.name for p in (grown / "shards").rglob("*.tar")}
    assert tars == {e["path"].split("/")[1] for e in after["shards"]}


def test_ffhq_metadata_source_uses_its_landmarks(tmp_path):
    import numpy as np

    from mambastyle.data.align import detect_faces
    from mambastyle.data.demo import photos
    from mambastyle.data.faces import process_input

    root = tmp_path / "ffhq"
    entries = {}
    for index, (_name, img) in enumerate(sorted(photos().items())):
        rel = f"in-the-wild-images/00000/{index:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        face = detect_faces(np.asarray(img))[0]
        entries[str(index)] = {
            "category": "training",
            "in_the_wild": {
                "file_path": rel,
                "face_landmarks": face.landmarks.tolist(),
                "face_rect": list(face.box),
            },
        }
    entries["2"] = {
        "category": "validation",
        "in_the_wild": {**entries["0"]["in_the_wild"], "file_path": "gone.png"},
    }
    entries["3"] = {"category": "training"}  # no in-the-wild record: not an input
    (root / "ffhq-dataset-v2.json").write_text(json.dumps(entries))

    refs = inputs_from_source(str(root / "ffhq-dataset-v2.json"))
    assert [r.key for r in refs] == ["ffhq_0", "ffhq_1", "ffhq_2"]
    folder = resolve(str(root / "in-the-wild-images" / "00000"))
    listed = dict(list_versions(folder))
    assert [r.version for r in refs] == [listed[r.loc.path] for r in refs[:2]] + [None]  # gone.png: none
    manifest = prepare(refs, resolve(str(tmp_path / "out")), CONFIG)
    assert manifest["counts"] == {**manifest["counts"], "inputs": 3, "written": 2, "quarantined": 1}
    assert manifest["counts"]["quarantine_reasons"] == {"missing": 1}
    # supplied landmarks give the same crop as detecting them
    given = process_input(refs[0], CONFIG).samples[0]
    detected = process_input(dataclasses.replace(refs[0], landmarks=None, box=None), CONFIG).samples[0]
    assert given.png == detected.png
    assert given.meta["detector_score"] is None and given.meta["ffhq_index"] == "0"
    # a malformed record is quarantined (bad_metadata), it does not stop the run
    bad = {"0": {"in_the_wild": {"file_path": "x.png", "face_landmarks": [[0, 0]] * 5}}, "1": entries["0"]}
    (root / "bad.json").write_text(json.dumps(bad))
    refs = inputs_from_source(str(root / "bad.json"))
    counts = prepare(refs, resolve(str(tmp_path / "out2")), CONFIG)["counts"]
    assert (
        counts["inputs"] == 2
        and counts["written"] == 1
        and counts["quarantine_reasons"] == {"bad_metadata": 1}
    )


@pytest.mark.slow
def test_ray_executor_on_a_two_node_cluster_gives_the_same_shards(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    refs = [
        r
        for r in demo_inputs()
        if "/original" in r.uri or "/flip" in r.uri or r.uri.startswith("demo://bad/")
    ]
    local = prepare(refs, resolve(str(tmp_path / "local")), CONFIG, workers=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        distributed = prepare(refs, resolve(str(tmp_path / "ray")), CONFIG, executor="ray")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert distributed["counts"] == local["counts"]
    assert [e["sha256"] for e in distributed["shards"]] == [e["sha256"] for e in local["shards"]]


def test_rerun_after_a_kill_during_processing_reuses_finished_work(demo_run, tmp_path, monkeypatch):
    import mambastyle.data.executors as executors
    import mambastyle.data.prepare as prep

    out, manifest = demo_run
    monkeypatch.setattr(prep, "UNIT_INPUTS", 8)
    real = executors.process_input
    calls = []
    kill_at = [20]

    def killed_at_20(ref, config):
        if kill_at and len(calls) == kill_at[0]:
            raise KeyboardInterrupt("simulated kill")
        calls.append(ref.key)
        return real(ref, config)

    monkeypatch.setattr(executors, "process_input", killed_at_20)
    target = resolve(str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        prepare(demo_inputs(), target, CONFIG, workers=1)
    assert not (tmp_path / "resumed" / "shards" / "manifest.json").exists()
    assert len(list((tmp_path / "resumed" / "shards" / "_work").glob("unit-*.tar"))) == 2  # 16 inputs saved
    calls.clear()
    kill_at.clear()
    again = prepare(demo_inputs(), target, CONFIG, workers=1)
    assert len(calls) == len(demo_files()) - 16  # only the unfinished units ran again
    assert again == manifest  # and the result is byte-for-byte what an uninterrupted run gives
    # the run's statistics say so, and their counts add up
    stats = json.loads((tmp_path / "resumed" / "shards" / "stats.json").read_text())
    n = len(demo_files())
    assert (stats["inputs"], stats["reused"], stats["computed"]) == (n, 16, n - 16)
    assert stats["written"] == manifest["counts"]["written"]
    assert stats["quarantine_reasons"] == manifest["counts"]["quarantine_reasons"]
    assert stats["quarantined"] == manifest["counts"]["quarantined"]
    assert set(stats["seconds"]) == {"process_and_write", "commit"} and stats["items_per_s"] > 0
    assert not list((tmp_path / "resumed" / "shards").glob("_work/*"))  # work files removed after the commit

    # a saved unit that is unreadable is recomputed, not trusted
    calls.clear()
    kill_at.append(20)
    with pytest.raises(KeyboardInterrupt):
        prepare(demo_inputs(), resolve(str(tmp_path / "second")), CONFIG, workers=1)
    first_unit = sorted((tmp_path / "second" / "shards" / "_work").glob("unit-*.tar"))[0]
    first_unit.write_bytes(b"not a tar")
    calls.clear()
    kill_at.clear()
    assert prepare(demo_inputs(), resolve(str(tmp_path / "second")), CONFIG, workers=1) == manifest
    assert len(calls) == len(demo_files()) - 8


def test_each_face_of_a_photo_lands_in_the_photos_split():
    from mambastyle.data.faces import process_input

    ref = next(r for r in demo_inputs() if r.uri == "demo://group/two_people.jpg")
    samples = process_input(ref, dataclasses.replace(CONFIG, multi_face="each")).samples
    assert len(samples) == 2
    assert {s.split for s in samples} == {split_of(ref.key, CONFIG.split)}


def test_storage_errors_stop_the_stage_instead_of_quarantining(tmp_path, monkeypatch):
    from mambastyle.data.faces import process_input
    from mambastyle.data.inputs import InputRef

    missing = InputRef("m", str(tmp_path / "gone.jpg"), loc=resolve(str(tmp_path / "gone.jpg")))
    assert process_input(missing, CONFIG).reason == "missing"  # a missing input is the input's fault

    def storage_down(self):
        raise OSError("AWS Error SLOW_DOWN after 5 attempts")

    monkeypatch.setattr(InputRef, "read", storage_down)
    with pytest.raises(OSError, match="SLOW_DOWN"):  # the environment's fault: no silent quarantine
        process_input(missing, CONFIG)


def test_decoding_refuses_formats_outside_the_allow_list():
    from mambastyle.data.images import InputRejected, decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InputRejected) as exc:
        decode_image(eps, 10_000_000)
    assert exc.value.reason == "not_an_image"


def test_an_input_that_kills_its_worker_is_quarantined_and_the_rest_complete(tmp_path, monkeypatch):
    import os

    import mambastyle.data.executors as executors

    real = executors.process_input

    def segfault_on_the_cat(ref, config):
        if ref.uri == "demo://bad/cat.jpg" and os.getpid() != parent:
            os._exit(139)  # what a segfault or the OOM killer looks like from outside
        return real(ref, config)

    parent = os.getpid()
    monkeypatch.setattr(executors, "process_input", segfault_on_the_cat)  # forked workers inherit it
    manifest = prepare(demo_inputs(), resolve(str(tmp_path / "out")), CONFIG, workers=2)
    c = manifest["counts"]
    assert c["inputs"] == c["written"] + c["quarantined"] == len(demo_files())
    quarantine = {
        q["source"]: q["reason"] for q in read_jsonl(tmp_path / "out" / "shards" / "quarantine.jsonl")
    }
    assert quarantine == {**EXPECTED_QUARANTINE, "demo://bad/cat.jpg": "worker_crash"}


def test_tar_bytes_is_what_tarfile_writes_and_reads_back(_seed):
    import random

    from mambastyle.data.shards import tar_bytes

    rng = random.Random(_seed)
    sizes = [0, 1, 511, 512, 513, 10240, 10239, *(rng.randrange(0, 300_000) for _ in range(20))]
    members = [(f"sample_{i:04d}_{'x' * rng.randrange(0, 60)}.{('png', 'json')[i % 2]}", rng.randbytes(n))
               for i, n in enumerate(sizes)]  # fmt: skip
    for count in (0, 1, 2, len(members)):
        want = io.BytesIO()
        with tarfile.open(fileobj=want, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members[:count]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
        got = tar_bytes(members[:count])
        assert got == want.getvalue()
        with tarfile.open(fileobj=io.BytesIO(got)) as tar:
            assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members[:count]
    with pytest.raises(ValueError):  # a name USTAR cannot hold is refused, not truncated
        tar_bytes([("n" * 300, b"")])


def test_write_shard_reports_the_size_and_sha256_of_what_it_wrote(tmp_path, _seed):
    import hashlib
    import random

    from mambastyle.data.shards import Sample, build_shard, write_shard

    rng = random.Random(_seed)
    samples = [Sample.of(f"k{i:03d}", "train", rng.randbytes(rng.randrange(0, 200_000)),
                         {"split": "train", "i": i, "x": rng.random()})
               for i in range(rng.randrange(1, 40))]  # fmt: skip
    for durable in (True, False):
        loc = resolve(str(tmp_path / f"s-{durable}.tar"))
        size, sha256 = write_shard(loc, samples, durable=durable)
        data = (tmp_path / f"s-{durable}.tar").read_bytes()
        assert data == build_shard(samples)
        assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert json.loads(tar.extractfile("k000.json").read()) == samples[0].meta
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _check_png_chunks(data: bytes) -> None:
    """Every chunk's CRC (Pillow checks none of IDAT's), and IHDR, IDAT, IEND in order."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    kinds, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"] and pos == len(data)


def test_encode_png_decodes_to_the_same_pixels_at_every_level(rng, monkeypatch):
    import numpy as np

    from mambastyle.data import images

    shapes = [(1, 1), (1, 7), (5, 1), *((int(h), int(w)) for h, w in rng.integers(2, 300, (4, 2)))]
    for level in range(10):
        h, w = shapes[level % len(shapes)]
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        smooth = np.clip(128 + np.cumsum(rng.integers(-3, 4, (h, w, 3)), axis=0), 0, 255).astype(np.uint8)
        rgb = smooth if level % 2 else noise  # photo-like (rows alike) and incompressible
        data = images.encode_png(rgb, level)
        _check_png_chunks(data)
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (w, h))
            assert np.array_equal(np.asarray(img), rgb)
        assert images.encode_png(rgb, level) == data  # same pixels and level: same bytes
    monkeypatch.setattr(images, "_isal_zlib", None)  # without ISA-L: zlib, the same pixels
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(images.encode_png(rgb, 1))) as img:
        assert np.array_equal(np.asarray(img), rgb)
    for bad in (np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(ValueError):
            images.encode_png(bad)
    with pytest.raises(ValueError, match="level"):
        images.encode_png(rgb, 10)


def _samples(root) -> dict[str, bytes]:
    """{sample key: PNG bytes} over the shards the manifest under ``root`` lists."""
    from mambastyle.data.shards import read_samples

    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    loc = resolve(str(root / "shards"))
    return {s.key: s.png for e in manifest["shards"] for s in read_samples(loc.join(e["path"]))}


def _files(root, manifest) -> dict[str, bytes]:
    return {e["path"]: (root / "shards" / e["path"]).read_bytes() for e in manifest["shards"]}


def test_extend_and_sync_process_new_inputs_only_and_keep_unchanged_shards(demo_run, tmp_path):
    from mambastyle.runstats import RunStats

    full_out, full = demo_run
    refs = sorted(demo_inputs(), key=lambda r: r.key)
    late = [r for r in refs if r.uri.startswith("demo://grace_hopper/")][:3] + [
        r for r in refs if r.uri == "demo://bad/cat.jpg"
    ]
    early = [r for r in refs if r not in late]
    root = tmp_path / "data"
    first = prepare(early, resolve(str(root)), CONFIG, workers=2)
    assert first["counts"]["inputs"] == len(early)
    before = _files(root, first)
    # new photos arrive: only they are processed, into shards after the existing ones
    stats = RunStats("prepare")
    grown = prepare(refs, resolve(str(root)), CONFIG, workers=2, stats=stats, mode="extend")
    assert (stats.inputs, stats.computed, stats.reused) == (len(refs), len(late), len(early))
    assert {k: v for k, v in _files(root, grown).items() if k in before} == before  # byte-identical
    new_paths = [e["path"] for e in grown["shards"] if e["path"] not in before]
    assert new_paths and all(
        int(p[-10:-4]) > max(int(q[-10:-4]) for q in before if q.split("/")[0] == p.split("/")[0])
        for p in new_paths if any(q.split("/")[0] == p.split("/")[0] for q in before)
    )  # fmt: skip
    c = grown["counts"]
    assert c == full["counts"]  # the same dataset as one run over everything, counted the same
    assert _samples(root) == _samples(full_out)  # same faces, same bytes, same keys (splits follow keys)
    # sync: inputs that left the source leave the dataset; only the shards holding them change
    gone = [r for r in refs if r.uri in ("demo://bad/coffee.jpg", "demo://grace_hopper/original.jpg")]
    gone += [r for r in late if r.uri != "demo://bad/cat.jpg"][:1]
    gone = list({r.key: r for r in gone}.values())
    kept = [r for r in refs if r not in gone]
    before = _files(root, grown)
    stats = RunStats("prepare")
    synced = prepare(kept, resolve(str(root)), CONFIG, workers=2, stats=stats, mode="sync")
    assert (stats.inputs, stats.computed, stats.reused) == (len(kept), 0, len(kept))
    c = synced["counts"]
    assert c["inputs"] == len(kept) == c["written"] + c["quarantined"]
    assert c["quarantined"] == full["counts"]["quarantined"] - 1 and "coffee" not in json.dumps(
        read_jsonl(root / "shards" / "quarantine.jsonl")
    )
    faces = _samples(root)
    assert set(faces) == {k for k in _samples(full_out)} - {r.key for r in gone}
    after = _files(root, synced)
    holders = {e["path"] for e in grown["shards"] if {r.key for r in gone} & set(e["inputs"])}
    assert holders and not holders & set(after)  # what else they held moved to appended shards
    unchanged = [p for p in before if p not in holders]
    assert {p: after[p] for p in unchanged} == {p: before[p] for p in unchanged}
    assert {p.name for p in (root / "shards").rglob("*.tar")} == {p.rsplit("/", 1)[1] for p in after}
    # extend over a smaller source keeps everything; nothing is processed
    stats = RunStats("prepare")
    extended = prepare(kept[:5], resolve(str(root)), CONFIG, workers=2, stats=stats, mode="extend")
    assert stats.computed == 0 and extended["counts"] == synced["counts"] and _files(root, extended) == after
    # other settings: every input is processed again
    stats = RunStats("prepare")
    prepare(kept, resolve(str(root)), dataclasses.replace(CONFIG, output_size=16), workers=2, stats=stats)
    assert stats.computed == len(kept)


def test_sync_processes_inputs_rewritten_in_place_again_and_extend_keeps_them(tmp_path):
    import os
    import shutil

    from mambastyle.runstats import RunStats

    files = demo_files()
    src, root = tmp_path / "photos", tmp_path / "data"
    names = ["astronaut/original.jpg", "astronaut/flip.png", "grace_hopper/original.jpg",
             "grace_hopper/jpeg_q25.jpg", "bad/cat.jpg"]  # fmt: skip
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(files[name])

    def run(mode):
        stats = RunStats("prepare")
        manifest = prepare(inputs_from_source(str(src)), resolve(str(root)), CONFIG, stats=stats, mode=mode)
        return manifest, stats

    first, _ = run("sync")
    assert first["counts"]["quarantined"] == 1 and set(first["input_versions"]) == {
        make_key(n) for n in names
    }  # fmt: skip
    before, faces_before = _files(root, first), _samples(root)
    # rewritten in place: a face photo with another face, the photo without a face with one;
    # and a photo touched (its bytes written again a second later): listed anew, not rewritten
    (src / names[0]).write_bytes(files["grace_hopper/crop.jpg"])
    (src / names[4]).write_bytes(files["astronaut/gray.png"])
    then = os.stat(src / names[3]).st_mtime_ns
    os.utime(src / names[3], ns=(then, then + 10**9))
    rewritten = {make_key(n) for n in (names[0], names[4])}
    # extend only adds: nothing is processed and the dataset stays as it was
    extended, stats = run("extend")
    assert (stats.computed, stats.reused) == (0, len(names))
    assert _files(root, extended) == before and extended["input_versions"] == first["input_versions"]
    # sync processes the rewritten ones again (extend left their recorded versions, so sync sees them)
    synced, stats = run("sync")
    assert (stats.computed, stats.reused) == (len(rewritten), len(names) - len(rewritten))
    fresh_root = tmp_path / "fresh"
    shutil.copytree(src, tmp_path / "src_copy")
    fresh = prepare(inputs_from_source(str(tmp_path / "src_copy")), resolve(str(fresh_root)), CONFIG)
    assert synced["counts"] == fresh["counts"] and synced["counts"]["quarantined"] == 0
    faces = _samples(root)
    assert faces == _samples(fresh_root)  # the same faces as one run over the folder as it is now
    assert faces[make_key(names[0])] != faces_before[make_key(names[0])]
    holders = {e["path"] for e in first["shards"] if rewritten & set(e["inputs"])}
    after = _files(root, synced)
    assert {p: after[p] for p in before if p not in holders} == {
        p: before[p] for p in before if p not in holders
    }
    listed = {r.key: r.version for r in inputs_from_source(str(src))}
    assert (
        synced["input_versions"] == listed != first["input_versions"]
    )  # the touched one: not read next time
    assert synced["input_sha256"] == fresh["input_sha256"] != first["input_sha256"]
    # nothing changed since: the next sync processes nothing
    again, stats = run("sync")
    assert stats.computed == 0 and _files(root, again) == after
    # a dataset recorded without versions: its inputs are taken as unchanged, their versions recorded
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    del manifest["input_versions"]
    (root / "shards" / "manifest.json").write_text(json.dumps(manifest))
    again, stats = run("sync")
    assert stats.computed == 0 and again["input_versions"] == synced["input_versions"]
    assert again["input_sha256"] == synced["input_sha256"]
