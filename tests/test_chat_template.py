"""Chat templates from model files, rendered in jinja2's sandbox, as transformers renders them."""
import pytest

from conftest import requires_torch
from edgeseek.chat_template import ChatTemplate
from edgeseek.errors import EdgeseekError
from edgeseek.gguf_file import GGUFFile

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi <b>there</b> & 'friends'"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2 + 2?"},
]
# DeepSeek-V3's template shape (reference: shared/reference/deepseek2-gguf.md), with tojson in use.
DEEPSEEK_V3 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
)


@requires_torch
@pytest.mark.parametrize("source", ["smollm2", "deepseek"])
def test_renders_as_transformers(smollm2_path, source):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    if source == "smollm2":
        template = ChatTemplate.from_gguf(GGUFFile(smollm2_path))
    else:
        template = ChatTemplate(DEEPSEEK_V3, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token=template.bos_token,
                                 eos_token=template.eos_token)
    hf.chat_template = template.source
    for add in (True, False):
        for msgs in (MESSAGES, MESSAGES[1:2]):
            extra = {"tools": [{"name": "calc", "description": "<math> & more"}]} if source == "deepseek" else {}
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add, **extra)
            assert template.render(msgs, add_generation_prompt=add, **extra) == want


def test_sandbox_refuses_internals():
    t = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", origin="evil.gguf")
    with pytest.raises(EdgeseekError, match="evil.gguf.*unsafe"):
        t.render(MESSAGES)


def test_template_errors_name_the_problem():
    with pytest.raises(EdgeseekError, match="syntax error at line 1"):
        ChatTemplate("{% for m in messages %}", origin="m.gguf")
    t = ChatTemplate("{{ raise_exception('only user and assistant roles') }}", origin="m.gguf")
    with pytest.raises(EdgeseekError, match="only user and assistant roles"):
        t.render(MESSAGES)


def test_missing_template_is_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgeseekError, match="tokenizer.chat_template"):
        ChatTemplate.from_gguf(GGUFFile(tmp_path / "m.gguf"))
