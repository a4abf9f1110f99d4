"""A saved checkpoint loads with transformers alone: standard processor classes, images reach the model.

Each test checks in a fresh interpreter that cannot import the project (``tests/plain_env_check.py``: run with
``python -I``, no PYTHONPATH, cwd outside the checkout, the editable install's finders dropped and an import
hook refusing ``mip_core``, ``tasks`` and ``flows``); the checkpoints are saved by ``mip_core.modeling.save_model``
in the test process.

What could not be tested here: building the full ``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor`` object with
its real video processor. Every transformers video processor needs torchvision, and torchvision cannot be
imported beside the CPU torch of this environment ("operator torchvision::nms does not exist"); no other
environment can be installed. So, where torchvision is missing, ``AutoVideoProcessor`` alone is replaced in the
child by a stand-in: it reads the saved video processor config with transformers' own reader, checks that it
names the class ``AutoVideoProcessor`` resolves for the model type (``Qwen2VLVideoProcessor``), holds only
settings that class's ``__init__`` accepts (read from its source) and matches the image processor's patching and
normalisation, and returns a bare ``BaseVideoProcessor``; and ``transformers.VideoProcessorMixin``, exported by
transformers only with torchvision, is exported so the processor's type check of its video processor resolves.
So the real video processor's construction and its processing of a video are not tested. Everything else is
the real path: ``AutoProcessor`` resolves the class from ``processor_config.json`` and returns exactly the
standard class, with the standard image processor and tokenizer; the model card's snippet runs as written (``images=`` through the chat template)
and gives the project's inputs and logits; another image changes the logits. Where torchvision imports (a
user's usual stack), the child uses the real ``AutoVideoProcessor`` and no stand-in.
"""

from __future__ import annotations

import json
import os

from plain_env_check import run_plain_check

from mip_core.adapters import adapter_class
from mip_core.modeling import save_model

STANDARD = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "llava": "LlavaProcessor"}


def test_saved_checkpoints_load_with_plain_auto_processor(tiny_models, tmp_path):
    dirs = {}
    for arch, (model, processor) in tiny_models.items():
        dirs[arch] = str(tmp_path / arch)
        save_model(model, processor, dirs[arch])
    report = run_plain_check([(dirs[arch], STANDARD[arch]) for arch in tiny_models], tmp_path)
    assert report["project_modules"] == []
    for arch, folder in dirs.items():
        found = report["models"][folder]
        assert found["processor"] == STANDARD[arch], found
        assert found["logit_change_other_image"] > 1e-4 and found["generated"] > 0, found
        if arch != "llava":
            assert "video_processor" in found["attributes"], found
            video = json.loads((tmp_path / arch / "processor_config.json").read_text())["video_processor"]
            assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    if not report["torchvision"]:
        assert set(report["video_stand_in"]) == {dirs[a] for a in dirs if a != "llava"}


def test_standardize_repairs_old_files_without_touching_a_linked_base(tiny_models, tmp_path):
    """A folder saved before the fix (the subclass's name, no video config) is repaired in place; a hard link
    into another checkpoint is replaced, not written through; running it again changes nothing."""
    model, processor = tiny_models["qwen2_5_vl"]
    base, edited = tmp_path / "base", tmp_path / "edited"
    save_model(model, processor, str(base))
    for name in ("processor_config.json", "tokenizer_config.json"):  # as the old build wrote them
        doc = json.loads((base / name).read_text())
        doc["processor_class"] = "ImageOnlyQwen2_5_VLProcessor"
        doc.pop("video_processor", None)
        (base / name).write_text(json.dumps(doc))
    edited.mkdir()
    for f in base.iterdir():
        os.link(f, edited / f.name)
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    cls = adapter_class("qwen2_5_vl")
    assert sorted(cls.standardize_processor_files(str(edited))) == ["processor_config.json", "tokenizer_config.json"]
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before
    proc = json.loads((edited / "processor_config.json").read_text())
    assert proc["processor_class"] == "Qwen2_5_VLProcessor" and "video_processor" in proc
    assert json.loads((edited / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert cls.standardize_processor_files(str(edited)) == []
    assert type(cls.load_processor(str(edited))).__name__ == "ImageOnlyQwen2_5_VLProcessor"  # loads here too
    assert adapter_class("llava").standardize_processor_files(str(edited)) == []


def test_usage_snippet_loads_with_auto_classes_and_passes_an_image():
    for arch in STANDARD:
        snippet = adapter_class(arch).usage_snippet("/models/v3")
        assert snippet.startswith("```python\n") and snippet.endswith("```\n")
        assert "AutoProcessor.from_pretrained('/models/v3')" in snippet
        assert "AutoModelForImageTextToText.from_pretrained('/models/v3')" in snippet
        assert "apply_chat_template" in snippet and "images=[" in snippet and "mip_core" not in snippet
