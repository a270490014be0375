"""Serving: requests, continuous batching over the step loop, and the OpenAI-compatible server.

    from pyengine.serve.params import SamplingParams
    from pyengine.serve.session import Session

The layer sits above execute (it drives the step loop and the launchers) and below cli.
"""
