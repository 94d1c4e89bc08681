"""Untrusted image bytes into the decoder every image goes through (images.load_image: predict.py, serve.py, the
dataset cache): never an exception other than one ImageError line. The long run (20,000 inputs, with timings
and memory) is benchmarks/fuzz_images.py; these are its short versions."""
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import images  # noqa: E402
import fuzz_images  # noqa: E402

PREP = images.Preprocess(img_size=32)


def test_mutated_images_of_six_formats(tmp_path, real_data):
    """A few hundred mutated JPEG/PNG/WebP/GIF/TIFF/BMP files (bytes flipped, inserted, deleted, duplicated, cut
    short, declared sizes made huge): each decodes or is refused with one line naming the file."""
    photo = sorted((real_data / "cars_train").glob("*.jpg"))[0]
    rep = fuzz_images.fuzz(400, seed=1, max_seconds=float("inf"), photo=photo, img_size=32, progress=False)
    assert rep.inputs == 400 and rep.counts["failure"] == 0, rep.failures
    assert rep.counts["ok"] > 0 and rep.counts["error"] > 0  # both outcomes were reached
    assert set(rep.by_format) >= {"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"}


def test_declared_huge_sizes_are_refused_as_bombs(tmp_path):
    import random
    seeds = fuzz_images.seed_images(None)
    for fmt in ("PNG", "GIF", "BMP", "JPEG"):
        b = bytearray(seeds[fmt])
        fuzz_images._set_huge_size(b, fmt, random.Random(0))
        path = tmp_path / f"bomb{fuzz_images.SUFFIX[fmt]}"
        path.write_bytes(bytes(b))
        out = fuzz_images.decode_one(path, PREP)
        assert out.kind == "error", (fmt, out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
                             b"II*\x00", b"MM\x00*", b"BM"]),
       body=st.binary(max_size=512))
def test_random_bytes_behind_real_magic_numbers(tmp_path, head, body):
    path = tmp_path / "x.img"
    path.write_bytes(head + body)
    out = fuzz_images.decode_one(path, PREP)
    assert out.kind in ("ok", "error"), out
