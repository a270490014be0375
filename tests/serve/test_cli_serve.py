"""`pyengine serve` as a user runs it: a subprocess on 127.0.0.1 (a free port, loopback only) over a
tiny Mixtral checkpoint with a tokenizer, driven by the official `openai` client. Every test starts
and stops its server and leaves no process behind.

Concurrent requests (half streaming) on gloo processes each equal transformers' greedy generate of
that request alone; a client that disconnects mid-stream frees its blocks (the metrics say so); bad
requests get 400; SIGTERM with requests in flight lets them finish and exits 0; a rank that dies
fails the in-flight requests with 503 and ends the server with one line naming it; bad flags exit 2
before anything starts."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import tiny_hf
from tiny_tokenizer import text_of, write_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
VOCAB = tiny_hf.SIZES["vocab"]
EOS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral-served")
    model = tiny_hf.build("mixtral", folder, dtype=torch.float32)
    write_tokenizer(folder, VOCAB)
    return folder, model


class Server:
    def __init__(self, folder, *flags: str, own_group: bool = False):
        cmd = [sys.executable, "-m", "pyengine", "serve", "--weights", str(folder), "--port", "0",
               "--max-model-len", "64", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=own_group)
        line = self.proc.stdout.readline()  # the first line is "listening on" (or the process ended)
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split("listening on ")[1].split()[0]
        self.model = line.split("(model '")[1].split("'")[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    def in_flight(self, pool, n: int, max_tokens: int) -> list:
        """n greedy requests of `max_tokens` tokens each (eos ignored) submitted on `pool`, once all n run."""
        client = self.client()
        futures = [pool.submit(client.completions.create, model=self.model, prompt=prompt(i, 4), max_tokens=max_tokens,
                               temperature=0, extra_body={"ignore_eos": True}) for i in range(n)]
        while self.metric("pyengine_requests_running") < n:
            time.sleep(0.02)
        return futures

    def ranks(self) -> list[int]:
        """PIDs of this server's rank processes (the process backends)."""
        out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(line.split()[0]) for line in out.stdout.splitlines() if "pyengine-rank" in line]

    def stop(self, signal_it: bool = True) -> tuple[int, str]:
        """SIGTERM (unless `signal_it` is False: one was sent already), then its exit code and stderr."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, err


@torch.no_grad()
def transformers_alone(model, ids: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompt(i: int, n: int) -> list[int]:
    return [3 + (5 * i + 7 * j) % (VOCAB - 3) for j in range(n)]  # never 0-2 (pad, bos, eos)


@pytest.fixture(scope="module")
def gloo_server(model_dir):
    server = Server(model_dir[0], "--backend", "gloo", "--max-seqs", "6", "--max-step-tokens", "12")
    yield server
    code, err = server.stop()
    assert code == 0, err
    assert not server.ranks()


def test_32_concurrent_requests_half_streaming_each_equal_transformers_alone(gloo_server, model_dir):
    model = model_dir[1]
    client = gloo_server.client()

    def one(i: int):
        ids, max_tokens = prompt(i, 1 + i % 9), 1 + (3 * i) % 8
        want = transformers_alone(model, ids, max_tokens)
        request = dict(model=gloo_server.model, prompt=text_of(ids) if i % 3 else ids, max_tokens=max_tokens,
                       temperature=0)
        if i % 2:
            got = []
            for chunk in client.completions.create(**request, stream=True):
                got += chunk.choices[0].model_extra["token_ids"] if chunk.choices else []
        else:
            got = client.completions.create(**request).choices[0].model_extra["token_ids"]
        assert got == want, i

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(32)))
    assert gloo_server.metric("pyengine_kv_blocks_used") == 0


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(gloo_server):
    import http.client

    body = {"prompt": prompt(1, 5), "max_tokens": 50, "temperature": 0, "stream": True, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", gloo_server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.readline().startswith(b"data: ")  # the stream has begun
    assert gloo_server.metric("pyengine_kv_blocks_used") > 0
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 60
    while gloo_server.metric("pyengine_kv_blocks_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gloo_server.metric("pyengine_kv_blocks_used") == 0
    assert gloo_server.metric("pyengine_requests_running") == 0
    assert gloo_server.metric('pyengine_requests_finished_total{reason="abort"}') == 1  # not run to its end


def test_bad_requests_get_400_naming_the_field_or_the_limit(gloo_server):
    import openai

    client = gloo_server.client()
    with pytest.raises(openai.BadRequestError, match="max_tokens = -3: must be in"):
        client.completions.create(model=gloo_server.model, prompt=[5], max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="= 70 exceed the 64 tokens a sequence may hold"):
        client.completions.create(model=gloo_server.model, prompt=prompt(0, 40), max_tokens=30)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\] = 37: must be in \[0, 37\)"):
        client.completions.create(model=gloo_server.model, prompt=[5, 37], max_tokens=3)


def test_sigterm_with_requests_in_flight_lets_them_finish_and_exits_0(model_dir):
    server = Server(model_dir[0], "--backend", "local", "--grace", "60")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = server.in_flight(pool, 3, 30)
        server.proc.send_signal(signal.SIGTERM)
        outs = [f.result(timeout=120) for f in futures]
    code, err = server.stop(signal_it=False)
    assert code == 0, err
    assert "leaked" not in err
    assert all(len(o.choices[0].model_extra["token_ids"]) == 30 for o in outs)
    assert "every request finished" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_drains_like_one_to_the_server(model_dir, signum):
    """`kill -- -PGID`, Ctrl-C in a terminal, a service manager's stop: every process of the group
    gets the signal; the rank processes must not die of it (the server would blame a rank)."""
    server = Server(model_dir[0], "--backend", "gloo", "--grace", "60", own_group=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = server.in_flight(pool, 2, 30)
        os.killpg(server.proc.pid, signum)
        outs = [f.result(timeout=120) for f in futures]
    code, err = server.stop(signal_it=False)
    assert code == 0, err
    assert "every request finished" in err and "rank" not in err, err
    assert all(len(o.choices[0].model_extra["token_ids"]) == 30 for o in outs)
    assert not server.ranks()


def test_a_rank_that_dies_fails_in_flight_requests_with_503_and_names_it(model_dir):
    import openai

    server = Server(model_dir[0], "--backend", "gloo")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = server.in_flight(pool, 2, 60)
        victim = max(server.ranks())  # rank 2: the last spawned
        os.kill(victim, signal.SIGKILL)
        for f in futures:
            with pytest.raises(openai.InternalServerError) as e:
                f.result(timeout=120)
            assert e.value.status_code == 503
    code, err = server.stop(signal_it=False)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("pyengine serve:")]
    assert len(lines) == 1 and "rank 2" in lines[0] and "SIGKILL" in lines[0], err
    assert not server.ranks()


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "--port = 70000: must be in [0, 65535]"),
    (["--host", "example.com"], "--host = 'example.com': must be an IP address"),
    (["--max-seqs", "0"], "--max-seqs = 0: must be in [1, 4096]"),
    (["--max-seqs", "8", "--max-step-tokens", "4"], "--max-step-tokens = 4: must be in [8, "),
    (["--grace", "-1"], "--grace = -1.0: must be in [0, "),
    (["--max-model-len", "1"], "--max-model-len = 1: must be in [2, "),
    (["--backend", "nccl"], "--backend = 'nccl': needs one CUDA GPU per rank"),
])
def test_bad_flags_exit_2_with_one_line(model_dir, flags, message):
    out = subprocess.run([sys.executable, "-m", "pyengine", "serve", "--weights", str(model_dir[0]), *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert message in out.stderr
