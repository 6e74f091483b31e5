"""Loading models works whether Hugging Face's hub kernels are usable or not (transformers >= 5.25 turns them on
by default and refuses to load any model when its kernel-hub package is missing)."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

CODE = """
import json, sys
import transformers.modeling_utils as mu, transformers.utils as tu, transformers.utils.import_utils as iu
if sys.argv[2] == "absent":  # as if the kernels package were not installed
    for m in (mu, tu, iu):
        m.is_kernels_available = lambda *a, **k: False
from fastpref.train.model import load_model
from fastpref.train.online.judges import RewardModel
lm = load_model(sys.argv[1] + "/lm")
rm = RewardModel(sys.argv[1] + "/rm", temperature=1.0, device="cpu")
print(json.dumps({"lm": type(lm).__name__, "rm": type(rm.model).__name__, "kernels": lm.use_kernels}))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from fastpref.train.synthetic import load_tokenizer

    root = tmp_path_factory.mktemp("hub")
    tok = load_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    for name, cls in (("lm", LlamaForCausalLM), ("rm", LlamaForSequenceClassification)):
        cls(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("kernels", ["available", "absent"])
def test_models_load_with_hub_kernels_available_or_absent(folders, kernels):
    out = subprocess.run([sys.executable, "-c", CODE, str(folders), kernels], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["lm"] == "LlamaForCausalLM" and got["rm"] == "LlamaForSequenceClassification"
    if kernels == "absent":
        assert got["kernels"] is False
