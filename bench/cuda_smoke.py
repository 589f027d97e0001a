import torch, time
from specq.models.config import ModelConfig
from specq.models.llama import Transformer
from specq.generate import Decoder, generate
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=500, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
m = Transformer(cfg).cuda().eval()
ids = list(range(1, 20))
a = generate(m, ids, 30, decoder=Decoder(m, 60, cuda_graph=True))
b = generate(m, ids, 30, decoder=Decoder(m, 60, cuda_graph=False))
print("graph==eager", a == b)
