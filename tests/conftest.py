import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "case_small")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixture_dir():
    return FIXTURE


@pytest.fixture(scope="session")
def golden_model():
    import glm
    return glm.ChatGLM.from_pretrained(FIXTURE, dtype=torch.float32, device="cpu").eval()


@pytest.fixture(scope="session")
def tok():
    import glm
    return glm.Tokenizer(os.path.join(FIXTURE, "ice_text.model"))
