"""Publishing: the export's README is a huggingface_hub ModelCard whose metadata validates
(licence inherited from the teacher, base_model, a `lora` tag for LoRA students, the eval results
with their protocol as model-index), and `fewstep export --push-to-hub` goes through
HfApi.create_repo + upload_folder (stand-ins here: nothing reaches the network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, ModelCardData

from fewstep.cli import main
from fewstep.export import export_student
from fewstep.export.hub import base_model_id, card_metadata, check_metadata, teacher_license
from tests.test_export import _teacher_folder, make_run

RESULTS = {
    "format": "fewstep-eval/1",
    "complete": True,
    "command": "fewstep eval --pipeline run --steps 1",
    "protocol": {"name": "digits"},
    "rows": [
        {
            "steps": 1,
            "guidance": 1.0,
            "hybrid": None,
            "sampler": "fewstep",
            "num_samples": 2000,
            "metrics": {"fid": {"value": 12.5}, "class_acc": {"value": 0.91}, "panel": {"median": 3.0}},
        }
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    dit = _teacher_folder(root / "teachers", "dit")  # a local folder without a model card
    snap = root / "cache" / "models--acme--tiny-sd15" / "snapshots" / "0123abcd"
    sd15 = _teacher_folder(snap.parent, "sd15")
    Path(sd15).rename(snap)  # the layout of a hub snapshot in the local cache
    (snap / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# tiny\n")
    full = make_run(root / "runs", "dit-dmd2-1", dit, "dmd2", {"num_steps": 1})
    (full / "eval").mkdir()
    (full / "eval" / "results.json").write_text(json.dumps(RESULTS))
    lora = make_run(root / "runs", "sd15-lora", str(snap), "dmd2", {"num_steps": 1}, lora=True)
    return {"root": root, "full": full, "lora": lora, "dit": dit, "snap": snap}


def test_card_of_a_lora_student_inherits_licence_and_base_model(runs, tmp_path):
    res = export_student(runs["lora"], tmp_path / "out")
    mc = ModelCard.load(res.out / "README.md")
    assert check_metadata(mc) == []
    d = mc.data
    assert d.license == "creativeml-openrail-m"  # the teacher's
    assert d.base_model == "acme/tiny-sd15" and d.library_name == "diffusers" and d.pipeline_tag == "text-to-image"
    assert "lora" in d.tags and {"fewstep", "distillation", "dmd2", "1-step"} <= set(d.tags)
    assert res.card["teacher"]["license"]["license"] == "creativeml-openrail-m"
    assert "creativeml-openrail-m`, the teacher's" in mc.text  # and the body says where it came from
    assert "num_inference_steps=1" in mc.text  # the existing body is kept under the new header


def test_card_of_a_full_student_has_the_eval_results_with_their_protocol(runs, tmp_path):
    res = export_student(runs["full"], tmp_path / "out")
    mc = ModelCard.load(res.out / "README.md")
    assert check_metadata(mc) == []
    d = mc.data
    assert "lora" not in d.tags and d.base_model is None  # a local teacher folder: no hub id
    assert d.license is None and "not known" in mc.text  # a teacher folder without a model card
    got = {(r.metric_type, r.dataset_type): r for r in d.eval_results}
    assert set(got) == {("fid", "digits"), ("class_acc", "digits")}  # the panel dict has no single value
    fid = got[("fid", "digits")]
    assert fid.metric_value == 12.5 and fid.task_type == "unconditional-image-generation"
    assert fid.metric_args == {"steps": 1, "guidance": 1.0, "num_samples": 2000, "sampler": "fewstep"}
    assert got[("class_acc", "digits")].metric_value == 0.91 and d.model_name == "dit-dmd2-1"
    assert "fid 12.5" in mc.text  # the evaluation table of the body


def test_licences_the_hub_does_not_list_are_written_as_other():
    card = {"teacher": {"source": "x", "license": {"license": "flux-1-dev-non-commercial-license"}}}
    card.update(conditioning="text", objective="dmd2", trained_steps=4, weights={})
    d = card_metadata(card)
    assert d.license == "other" and d.license_name == "flux-1-dev-non-commercial-license"
    assert check_metadata(ModelCard(f"---\n{d.to_yaml()}\n---\n")) == []
    assert teacher_license("digits-vp", None)["license"] == "apache-2.0"  # the project's own teachers
    assert base_model_id("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"
    assert base_model_id("./stabilityai/sdxl-turbo") is None


def test_check_metadata_finds_what_the_hub_refuses():
    bad = ModelCard("---\nlicense: my-own\nbase_model: /home/me/teacher\ntags:\n- fewstep\n---\n")
    problems = check_metadata(bad)
    assert any("license 'my-own'" in p for p in problems) and any("base_model" in p for p in problems)
    assert check_metadata(ModelCard("---\nlicense: other\n---\n")) == ["license 'other' needs license_name"]
    good = ModelCardData(license="mit", tags=["a"], base_model="a/b")
    assert check_metadata(ModelCard(f"---\n{good.to_yaml()}\n---\n")) == []


class _Hub:
    """Stand-ins of HfApi.create_repo / upload_folder recording what would be uploaded."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def install(self, monkeypatch):
        hub = self

        def create_repo(self, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kw):
            if hub.fail:
                raise ConnectionError("the Hub is not reachable")
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            readme = ModelCard.load(Path(folder_path) / "README.md")
            hub.calls.append(("upload_folder", repo_id, folder_path, files, readme, kw))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_creates_the_repo_and_uploads_the_export(runs, tmp_path, monkeypatch, capsys):
    hub = _Hub().install(monkeypatch)
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(runs["lora"]), "--out", str(out), "--push-to-hub", "me/student"]
    assert main([*argv, "--private"]) == 0
    (c, repo, kw), (u, repo2, folder, files, readme, ukw) = hub.calls
    assert (c, repo, u, repo2) == ("create_repo", "me/student", "upload_folder", "me/student")
    assert kw == {"repo_type": "model", "private": True, "exist_ok": True}
    assert Path(folder) == out and ukw["repo_type"] == "model"
    for f in ("README.md", "fewstep_card.json", "model_index.json", "scheduler/scheduler_config.json"):
        assert f in files, files
    assert "unet/diffusion_pytorch_model.safetensors" in files and any(f.startswith("lora/") for f in files)
    assert readme.data.license == "creativeml-openrail-m" and "lora" in readme.data.tags
    assert "pushed" in capsys.readouterr().out
    hub.calls.clear()
    assert main([*argv, "--overwrite"]) == 0  # public
    assert hub.calls[0][2]["private"] is False


def test_push_failures_are_one_line_and_keep_the_export(runs, tmp_path, monkeypatch, capsys):
    hub = _Hub(fail=True).install(monkeypatch)
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(runs["full"]), "--out", str(out), "--push-to-hub", "me/s"]) == 2
    err = capsys.readouterr().err
    assert "the upload failed (ConnectionError: the Hub is not reachable)" in err and str(out) in err
    assert (out / "README.md").is_file()  # the export itself is complete
    bad = tmp_path / "bad"
    for repo, msg in (("no-owner", "give owner/name"), ("me/bad name!", "not a valid repo id")):
        assert main(["export", "--checkpoint", str(runs["full"]), "--out", str(bad), "--push-to-hub", repo]) == 2
        assert msg in capsys.readouterr().err and not bad.exists()  # refused before anything is written
    assert main(["export", "--checkpoint", str(runs["full"]), "--out", str(bad), "--private"]) == 2
    assert "--private applies to --push-to-hub" in capsys.readouterr().err
    assert [c[0] for c in hub.calls] == ["create_repo"]
