"""``rayawq chat`` driven through a pseudo-terminal, and ``rayawq generate`` as a script would call it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def test_chat_cli_in_a_pty(tiny_model_factory):
    pexpect = pytest.importorskip("pexpect")
    model = tiny_model_factory("llama")
    child = pexpect.spawn(sys.executable, ["-m", "serving.cli", "chat", str(model), "--dtype", "float32",
                                           "--max-tokens", "6", "--device", "cpu"],
                          cwd=str(ROOT), env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline("hello there")
        child.expect_exact(">>> ")
        first = child.before
        child.sendline("and again")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact(">>> ")
        child.sendline("hello there")
        child.expect_exact(">>> ")
        # after /reset the same first turn gives the same (greedy) answer
        assert child.before.strip() == first.strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_generate_cli_prints_only_the_completion(tiny_model_factory):
    from serving import EngineConfig, GenerationConfig
    from serving.pipeline import pipeline

    model = tiny_model_factory("llama")
    pipe = pipeline(str(model), EngineConfig(dtype="float32", progress=False))
    want = pipe("the city of", GenerationConfig(max_new_tokens=10), do_preprocess=False).text
    want_chat = pipe("the city of", GenerationConfig(max_new_tokens=10)).text
    base = [sys.executable, "-m", "serving.cli", "generate", str(model), "--prompt", "the city of",
            "--max-tokens", "10", "--dtype", "float32"]
    r = subprocess.run(base, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    r = subprocess.run(base + ["--chat"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == want_chat + "\n"
    r = subprocess.run(base + ["--temperature", "-2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "temperature" in r.stderr and r.stdout == ""


def test_generate_cli_with_tp_starts_its_own_ray(tiny_model_factory):
    """``--tp 2`` with no Ray running: the command starts a local Ray, splits the model over two ranks (gloo on
    CPU), prints what one rank prints, and takes its Ray down on exit."""
    from serving import EngineConfig, GenerationConfig
    from serving.pipeline import pipeline

    model = tiny_model_factory("qwen2")
    with pipeline(str(model), EngineConfig(dtype="float32", progress=False)) as pipe:
        want = pipe("the city of", GenerationConfig(max_new_tokens=10), do_preprocess=False).text
    cmd = [sys.executable, "-m", "serving.cli", "generate", str(model), "--prompt", "the city of",
           "--max-tokens", "10", "--dtype", "float32", "--device", "cpu", "--tp", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env={k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == want + "\n"


TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_chat_template_replaces_the_tokenizers(tiny_model_factory, tmp_path):
    """``EngineConfig(chat_template=...)`` / ``--chat-template``: Jinja text or a file, used for every chat prompt;
    a broken template or a missing file fails at load with what is wrong."""
    from serving import EngineConfig, GenerationConfig, LLMEngine
    from serving.pipeline import pipeline

    model = tiny_model_factory("llama")
    f = tmp_path / "chat.jinja"
    f.write_text(TEMPLATE)
    msgs = [{"role": "user", "content": "the city of"}]
    for tpl in (TEMPLATE, str(f)):
        eng = LLMEngine(model, EngineConfig(dtype="float32", progress=False, chat_template=tpl))
        want = eng.tokenizer.encode("[user] the city of\n[assistant] ", add_special_tokens=False)
        assert eng.encode(msgs) == want and eng.encode("the city of", chat=True) == want
    with pytest.raises(ValueError, match=r"line 1"):
        LLMEngine(model, EngineConfig(dtype="float32", progress=False, chat_template="{% for m in messages %}"))
    with pytest.raises(ValueError, match="not found"):
        LLMEngine(model, EngineConfig(dtype="float32", progress=False, chat_template=str(tmp_path / "no.jinja")))
    g = GenerationConfig(max_new_tokens=8)
    with pipeline(str(model), EngineConfig(dtype="float32", progress=False, chat_template=TEMPLATE)) as pipe:
        want_text = pipe("the city of", g).text
    base = [sys.executable, "-m", "serving.cli", "generate", str(model), "--prompt", "the city of", "--chat",
            "--max-tokens", "8", "--dtype", "float32"]
    r = subprocess.run(base + ["--chat-template", str(f)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == want_text + "\n", r.stderr[-2000:]
    r = subprocess.run(base + ["--chat-template", "missing.jinja"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "chat template file 'missing.jinja' not found" in r.stderr
