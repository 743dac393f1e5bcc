import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

POSITIVE = ["I love this, it is wonderful.", "What a great and happy day!", "This is the best movie ever made.",
            "Absolutely fantastic service, thank you!", "She was delighted with the beautiful gift.",
            "An excellent, brilliant performance.", "I am so glad and grateful today.", "Such a lovely, charming place.",
            "The food was amazing and the staff were kind.", "A joyful, uplifting story.", "Perfect, I enjoyed every minute.",
            "Great product, works perfectly.", "We had a wonderful time together.", "This made me smile all day.",
            "Brilliant idea, I really like it.", "The concert was awesome and fun.", "Such good news, congratulations!",
            "The hotel was clean, cozy and pleasant.", "A masterpiece, truly inspiring.", "I feel happy and loved."]
NEGATIVE = ["I hate this, it is awful.", "What a terrible and sad day.", "This is the worst movie ever made.",
            "Horrible service, never again.", "She was furious about the ugly gift.", "A boring, dreadful performance.",
            "I am so angry and upset today.", "Such a nasty, dirty place.", "The food was disgusting and the staff rude.",
            "A depressing, miserable story.", "Useless, I regret every minute.", "Broken product, a total waste.",
            "We had a painful time together.", "This ruined my whole day.", "Stupid idea, I really dislike it.",
            "The concert was a disaster and dull.", "Such bad news, I am sorry.", "The hotel was filthy and unpleasant.",
            "A failure, truly disappointing.", "I feel lonely and hurt."]


@pytest.fixture(scope="session")
def encoder():
    from encoder import TINY_ENCODER, load_encoder
    return load_encoder(TINY_ENCODER)


@pytest.fixture(scope="session")
def sentiment_embeddings(encoder):
    from encoder import embed
    e = torch.from_numpy(embed(encoder, POSITIVE + NEGATIVE))
    y = torch.tensor([1.0] * len(POSITIVE) + [0.0] * len(NEGATIVE))
    return e, y
