"""The MoE block: its stages (what each computes, costs and holds), the payloads that move
between them, the boundary patterns between the experts and the output stage, and the weights.

Torch is imported only inside the functions that compute, so the prediction side can import
this package without it.
"""
