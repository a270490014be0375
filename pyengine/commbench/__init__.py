"""`pyengine bench comm`: the nccl-tests-style communication benchmark over any transport.

One record per collective (pyengine.commbench.collectives), one harness that times and checks
every record the same way (pyengine.commbench.harness), one entry for the CLI and for
`python -m pyengine.commbench` under torchrun (pyengine.commbench.cli).
"""
