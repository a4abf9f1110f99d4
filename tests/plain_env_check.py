"""Load saved checkpoints the way a user without this project would; run by tests in a fresh interpreter.

Usage: ``python -I plain_env_check.py SPEC.json RESULT.json`` with the project made unimportable (see
:func:`forbid_project`). SPEC lists checkpoints: ``{"repo": ..., "image": png, "other_image": png, "models":
[{"dir": ..., "processor_class": "...", "snippet": markdown, "reference": torch file}]}``; the reference holds
what the project computed for the snippet's prompt (``input_ids``, ``pixel_values``, ``logits``).

Per checkpoint, with transformers alone:

1. ``processor_config.json`` and ``tokenizer_config.json`` name ``processor_class``, and transformers' own
   resolution (``processor_class_from_name``, what ``AutoProcessor`` calls) maps it to the class it ships;
2. ``AutoImageProcessor`` loads the image processor named in the files and turns the image into pixel_values;
   ``AutoTokenizer`` loads the tokenizer;
3. ``AutoProcessor.from_pretrained`` returns exactly the standard processor class. Where torchvision cannot be
   imported (the standard Qwen-VL processors need a video processor, and every video processor needs
   torchvision), ``AutoVideoProcessor`` alone is replaced by a stand-in that reads the saved video processor
   config with transformers' own reader (``get_video_processor_config``), checks it names the class
   ``AutoVideoProcessor`` resolves for the model type and only settings that class accepts, and returns a bare
   ``BaseVideoProcessor``; ``transformers.VideoProcessorMixin``, which transformers exports only with
   torchvision, is exported too (a processor checks its video processor against it). Everything else is the
   real loading path;
4. the model card's usage snippet runs as written (image path substituted): its inputs equal the project's
   and the loaded model's logits for them equal the project's;
5. the image reaches the model: the same prompt with another image gives other logits.
"""

from __future__ import annotations

import ast
import importlib.abc
import json
import os
import re
import sys

PROJECT_PACKAGES = ("mip_core", "tasks", "flows")


class _NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT_PACKAGES:
            raise ImportError(f"{name} imported in the plain environment")
        return None


def forbid_project(repo: str) -> None:
    """Make the project unimportable: drop the checkout and the editable install's finders, then refuse the names."""
    root, prefix = os.path.realpath(repo), os.path.realpath(sys.prefix)

    def project_dir(p: str) -> bool:  # the checkout or a folder in it, except the interpreter's own (a venv)
        real = os.path.realpath(p)
        inside = real == root or real.startswith(root + os.sep)
        return inside and not (real == prefix or real.startswith(prefix + os.sep))

    sys.path[:] = [p for p in sys.path if p not in ("", ".") and not project_dir(p)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                        and "editable" not in getattr(f, "__module__", "").lower()]
    sys.meta_path.insert(0, _NoProject())
    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES:
            raise AssertionError(f"{name} was imported before the guard")


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or "operator torchvision::nms does not exist" beside a mismatched torch
        return False
    return True


def _accepted_video_settings(class_name: str) -> set[str]:
    """Settings ``class_name``'s ``__init__`` accepts, read from its source (the module imports torchvision)."""
    from pathlib import Path

    import transformers
    from transformers.processing_utils import VideosKwargs

    sources = [f.read_text(encoding="utf-8") for f in
               Path(transformers.__file__).parent.glob("models/*/video_processing_*.py")]
    source = next(s for s in sources if re.search(rf"^class {class_name}\(", s, re.M))
    tree = ast.parse(source)
    accepted = set(VideosKwargs.__annotations__)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name.endswith("InitKwargs"):
            accepted |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            accepted |= {t.id for s in node.body if isinstance(s, ast.Assign) for t in s.targets
                         if isinstance(t, ast.Name)}
    return accepted


def _mapped_video_processors(model_type: str) -> set[str]:
    """The video processor classes transformers maps ``model_type`` to, read from the mapping's source: without
    torchvision the loaded ``VIDEO_PROCESSOR_MAPPING_NAMES`` has every class name set to None."""
    import importlib.util

    found = set()
    for module in ("auto_mappings", "video_processing_auto"):
        spec = importlib.util.find_spec(f"transformers.models.auto.{module}")
        for node in ast.walk(ast.parse(open(spec.origin, encoding="utf-8").read())):
            if (isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Constant)
                    and node.elts[0].value == model_type and isinstance(node.elts[1], ast.Dict)):
                found |= {v.value for v in node.elts[1].values if isinstance(v, ast.Constant)}
    return found


def install_video_stand_in(report: dict) -> None:
    """Replace AutoVideoProcessor (which needs torchvision) by a checked stand-in; see the module docstring."""
    import importlib

    from transformers.video_processing_utils import BaseVideoProcessor

    # the module itself (``from transformers.models.auto import ...`` gives a placeholder without torchvision)
    vpa = importlib.import_module("transformers.models.auto.video_processing_auto")

    class StandInAutoVideoProcessor:
        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            settings = vpa.get_video_processor_config(path)
            assert settings, f"{path}: no video processor config"
            model_type = json.load(open(os.path.join(path, "config.json")))["model_type"]
            expected = _mapped_video_processors(model_type)
            assert settings.get("video_processor_type") in expected, (settings, expected)
            unknown = set(settings) - _accepted_video_settings(settings["video_processor_type"]) - {
                "video_processor_type", "processor_class"}
            assert not unknown, f"{path}: the video processor does not accept {sorted(unknown)}"
            images = json.load(open(os.path.join(path, "processor_config.json")))["image_processor"]
            shared = {k for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std",
                                  "size", "rescale_factor", "do_normalize") if k in images}
            assert {k: settings.get(k) for k in shared} == {k: images[k] for k in shared}, (settings, images)
            report.setdefault("video_stand_in", []).append(path)
            stand_in = BaseVideoProcessor()
            for key, value in settings.items():
                setattr(stand_in, key, value)
            return stand_in

    vpa.AutoVideoProcessor = StandInAutoVideoProcessor  # processors look it up in this module, by name
    # what transformers exports once torchvision is installed: the base class a processor checks its video
    # processor against (without torchvision the name is missing and the check cannot resolve it)
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):
        transformers.VideoProcessorMixin = VideoProcessorMixin


def check_model(entry: dict, spec: dict, report: dict) -> None:
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name

    path, name = entry["dir"], entry["processor_class"]
    out = report.setdefault("models", {}).setdefault(path, {})
    # 1. the files name the standard class, and transformers resolves the name to its own class
    proc_cfg = json.load(open(os.path.join(path, "processor_config.json")))
    tok_cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert proc_cfg["processor_class"] == name, proc_cfg["processor_class"]
    assert tok_cfg.get("processor_class") == name, tok_cfg.get("processor_class")
    standard = processor_class_from_name(name)
    assert standard is getattr(transformers, name) and standard.__module__.startswith("transformers.models."), standard
    # 2. the sub-processors alone
    image = Image.open(spec["image"]).convert("RGB")
    image_processor = AutoImageProcessor.from_pretrained(path)
    named = proc_cfg["image_processor"]["image_processor_type"]
    assert type(image_processor).__name__ in (named, named + "Pil"), (type(image_processor), named)
    pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.numel() > 0
    tokenizer = AutoTokenizer.from_pretrained(path)
    # 3. AutoProcessor: the standard class, complete
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor) is standard, type(processor)
    assert type(processor.image_processor) is type(image_processor), type(processor.image_processor)
    assert type(processor.tokenizer) is type(tokenizer)
    assert isinstance(processor.chat_template, str) and processor.chat_template
    out["processor"] = type(processor).__name__
    out["image_processor"] = type(processor.image_processor).__name__
    out["attributes"] = processor.get_attributes()
    # 4. the card's snippet, as written
    code = re.search(r"```python\n(.*?)```", entry["snippet"], re.S).group(1)
    assert '"photo.jpg"' in code
    scope: dict = {}
    exec(compile(code.replace('"photo.jpg"', repr(spec["image"])), "<usage snippet>", "exec"), scope)
    inputs, model = scope["inputs"], scope["model"]
    assert type(scope["processor"]) is standard and isinstance(model, transformers.PreTrainedModel)
    assert "pixel_values" in inputs, list(inputs)
    ref = torch.load(entry["reference"], weights_only=True)
    assert torch.equal(inputs["input_ids"], ref["input_ids"]), (inputs["input_ids"], ref["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], ref["pixel_values"])
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        torch.testing.assert_close(logits, ref["logits"])
        # 5. the image reaches the model: only the pixels change
        other = processor(text=[scope["prompt"]], images=[Image.open(spec["other_image"]).convert("RGB")],
                          return_tensors="pt")
        assert torch.equal(other["input_ids"], inputs["input_ids"])
        other_logits = model(**other).logits[0, -1]
    out["logit_change_other_image"] = float((other_logits - logits).abs().max())
    assert out["logit_change_other_image"] > 1e-4, out
    out["generated"] = scope["output"].shape[1] - inputs["input_ids"].shape[1]


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    forbid_project(spec["repo"])
    for pkg in PROJECT_PACKAGES:
        try:
            __import__(pkg)
        except ImportError:
            continue
        raise AssertionError(f"{pkg} is importable in the plain environment")
    report: dict = {"torchvision": torchvision_importable()}
    if not report["torchvision"]:
        install_video_stand_in(report)
    for entry in spec["models"]:
        check_model(entry, spec, report)
    report["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES)
    json.dump(report, open(sys.argv[2], "w"), indent=2)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------------- parent side
def run_plain_check(checkpoints: list[tuple[str, str]], workdir) -> dict:
    """Check saved ``(folder, standard processor class)`` pairs in a fresh interpreter without the project.

    Runs in the test process (it imports the project): computes the reference inputs and logits for the model
    card's prompt with the project's own loading path, then runs this file with ``python -I`` (no PYTHONPATH,
    no script folder on the path), from ``workdir``. Returns the child's report; raises with its output on failure.
    """
    import ast
    import subprocess
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from mip_core.modeling import load_model

    workdir = Path(workdir)
    repo = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    images = []
    for name in ("image.png", "other_image.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(workdir / name)
        images.append(str(workdir / name))
    models = []
    for k, (folder, processor_class) in enumerate(checkpoints):
        loaded = load_model(folder)
        snippet = type(loaded.adapter).usage_snippet(folder)
        messages = ast.literal_eval(re.search(r"^messages = (.*)$", snippet, re.M).group(1))
        prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = loaded.processor(text=[prompt], images=[Image.open(images[0]).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            logits = loaded.model(**inputs).logits[0, -1]
        reference = workdir / f"reference{k}.pt"
        torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits},
                   reference)
        models.append({"dir": folder, "processor_class": processor_class, "snippet": snippet,
                       "reference": str(reference)})
    spec, result = workdir / "plain_spec.json", workdir / "plain_report.json"
    spec.write_text(json.dumps({"repo": str(repo), "image": images[0], "other_image": images[1], "models": models}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-I", str(Path(__file__).resolve()), str(spec), str(result)], cwd=workdir,
                         env=env, capture_output=True, text=True, timeout=240)
    if run.returncode != 0:
        raise AssertionError(f"plain-environment check failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n"
                             f"{run.stderr[-6000:]}")
    return json.loads(result.read_text())
