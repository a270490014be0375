"""The OpenAI-compatible server (pyengine.serve.app over the runner) driven by the official `openai`
client on 127.0.0.1, over fake step loops on three virtual ranks: concurrent requests, half
streaming, each equal to its solo output; a client that disconnects mid-stream frees its blocks;
bad requests get 400 naming the field; a failing rank ends in-flight requests with 503; draining
finishes what runs."""

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import pytest

from fake_step_loop import TinyModel
from pyengine.serve.params import SamplingParams
from serve_harness import InProcessServer
from tiny_tokenizer import text_of, write_tokenizer

VOCAB = 40
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def server(folder):
    srv = InProcessServer(folder, slots=6, step_tokens=12, delay_s=0.002)
    yield srv
    srv.stop()
    assert srv.error is None and srv.outcome[0].aborted == 0


def prompt_ids(i: int, n: int) -> list[int]:
    return [6 + (i * 7 + 3 * j) % (VOCAB - 6) for j in range(n)]


def solo(ids, max_tokens, **kw) -> list[int]:
    return TinyModel(VOCAB).solo(ids, SamplingParams(max_new_tokens=max_tokens, **kw))


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_32_concurrent_requests_half_streaming_each_equal_to_its_solo_output(server):
    client = server.client()

    def one(i: int):
        ids = prompt_ids(i, 1 + i % 11)
        max_tokens = 2 + (i * 5) % 13
        want = solo(ids, max_tokens)
        prompt = text_of(ids) if i % 4 < 2 else ids  # text and ids alike
        if i % 2:
            parts, finish, usage = [], None, None
            for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}):
                if chunk.choices:
                    parts.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            text = "".join(parts)
        else:
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
            text, finish, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
        assert text.split() == text_of(want).split(), i
        assert finish == "length"
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), max_tokens)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(32)))
    assert server.metric("pyengine_kv_blocks_used") == 0


def test_chat_completions_through_the_template(server):
    client = server.client()
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w10 w11 w12"}],
                                         max_tokens=5, temperature=0)
    want = solo([3, 10, 11, 12, 4], 5)  # "user w10 w11 w12 assistant"
    assert out.choices[0].message.content.split() == text_of(want).split()
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "w10 w11 w12"}], max_tokens=5, temperature=0,
        stream=True) if c.choices]
    assert "".join(parts).split() == text_of(want).split()


def test_seeded_sampling_is_reproducible_and_stop_strings_cut_the_text(server):
    client = server.client()
    kw = dict(model="tiny", prompt=prompt_ids(3, 4), max_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b == text_of(solo(prompt_ids(3, 4), 12, temperature=0.9, top_p=0.9, seed=42))
    words = a.split()
    stop = words[4]
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text.split() == words[:words.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert r.status == 200
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
    for name in ("pyengine_requests_running", "pyengine_requests_waiting", "pyengine_kv_blocks_used",
                 "pyengine_tokens_per_second", "pyengine_time_to_first_token_seconds_bucket",
                 "pyengine_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    import http.client

    body = {"model": "tiny", "prompt": prompt_ids(1, 5), "max_tokens": 55, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    events = [reply.readline() for _ in range(6)]  # a few events in
    assert any(line.startswith(b"data: ") for line in events)
    assert server.metric("pyengine_kv_blocks_used") > 0
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.metric("pyengine_kv_blocks_used") == 0 and server.metric("pyengine_requests_running") == 0:
            break
        time.sleep(0.05)
    assert server.metric("pyengine_kv_blocks_used") == 0
    assert server.metric('pyengine_requests_finished_total{reason="abort"}') >= 1


@pytest.mark.parametrize("body,status,words", [
    ({"prompt": [7, 8], "max_tokens": 0}, 400, "max_tokens = 0: must be in [1, "),
    ({"prompt": [7, 8], "temperature": 3}, 400, "temperature = 3: must be in [0, 2]"),
    ({"prompt": [7, 8], "top_p": 0}, 400, "top_p = 0: must be in (0, 1]"),
    ({"prompt": [7, 8], "top_k": 1.5}, 400, "top_k = 1.5: must be an integer"),
    ({"prompt": [7, 8], "seed": -1}, 400, "seed = -1: must be in [0, "),
    ({"prompt": [7, 40]}, 400, "prompt[1] = 40: must be in [0, 40)"),
    ({"prompt": []}, 400, "prompt = []: must be text or a non-empty list of token ids"),
    ({"prompt": [7] * 60, "max_tokens": 10}, 400, "prompt = 60: tokens + max_tokens 10 = 70 exceed the model's 64 positions"),
    ({"prompt": [7], "max_tokens": 63, "stop": 5}, 400, "stop = 5: must be a string or a list of strings"),
    ({"prompt": [7], "n": 2}, 400, "n = 2: is not supported"),
    ({"prompt": [7], "stream": "yes"}, 400, "stream = 'yes': must be true or false"),
    ({"prompt": [7], "model": "gpt-4"}, 404, "model = 'gpt-4': this server serves 'tiny'"),
    (b"{not json", 400, "the request body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deep"),
    ({"prompt": [7], "n": True}, 400, "n = True: is not supported"),  # true == 1 in Python, not in JSON
    ({"prompt": [7], "logprobs": 0}, 400, "logprobs = 0: is not supported"),  # 0 asks for the drawn id's
    ({"prompt": [7], "stream": True, "stream_options": {"include_usage": "no"}}, 400,
     "stream_options.include_usage = 'no': must be true or false"),
])
def test_bad_requests_get_an_error_naming_the_field(server, body, status, words):
    code, reply = post(f"{server.url}/v1/completions", body)
    assert code == status
    assert words in reply["error"]["message"], reply


def test_the_openai_client_sees_the_400_message(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature = 3.5: must be in"):
        server.client().completions.create(model="tiny", prompt=[7], temperature=3.5)
    with pytest.raises(openai.BadRequestError, match="= 68 need 17 KV blocks of 4 tokens; the whole KV cache has 16"):
        big = InProcessServer(None, world=1, blocks=16, max_positions=None)
        try:
            big.client().completions.create(model="tiny", prompt=[7] * 60, max_tokens=8)
        finally:
            big.stop()


def test_without_a_tokenizer_prompts_are_ids_and_text_is_the_ids():
    srv = InProcessServer(None, world=2)
    try:
        client = srv.client()
        out = client.completions.create(model="tiny", prompt=[9, 10, 11], max_tokens=4, temperature=0)
        assert out.choices[0].text == " ".join(map(str, solo([9, 10, 11], 4)))
        code, reply = post(f"{srv.url}/v1/completions", {"prompt": "w9 w10"})
        assert code == 400 and "prompt = 'w9 w10': must be token ids" in reply["error"]["message"]
        code, reply = post(f"{srv.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert code == 404 and "needs a tokenizer with a chat template" in reply["error"]["message"]
    finally:
        srv.stop()


def test_a_rank_that_fails_ends_in_flight_requests_with_503(folder):
    srv = InProcessServer(folder, fail_at_step=8, fail_rank=2, delay_s=0.01)
    import openai

    client = srv.client()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=prompt_ids(i, 3), max_tokens=40,
                               temperature=0) for i in range(4)]
        for f in futures:
            with pytest.raises(openai.InternalServerError) as e:
                f.result(timeout=60)
            assert e.value.status_code == 503
    srv.thread.join(60)
    assert srv.error is not None and "rank 2" in str(srv.error).splitlines()[0]


def test_draining_finishes_what_runs_and_refuses_what_comes():
    srv = InProcessServer(None, world=2, delay_s=0.01, grace_s=30)
    client = srv.client()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=[9 + i], max_tokens=30,
                               temperature=0) for i in range(3)]
        while srv.metric("pyengine_requests_running") < 3:
            time.sleep(0.01)
        srv.drain.set()
        time.sleep(0.1)
        code, reply = post(f"{srv.url}/v1/completions", {"prompt": [9]})
        assert code == 503 and "shutting down" in reply["error"]["message"]
        for i, f in enumerate(futures):
            assert f.result(timeout=60).choices[0].text == " ".join(map(str, solo([9 + i], 30)))
    srv.stop()
    assert srv.error is None and srv.outcome[0].aborted == 0


def test_draining_past_the_grace_aborts_what_runs():
    srv = InProcessServer(None, world=2, delay_s=0.05, grace_s=0.3)
    import openai

    client = srv.client()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=[9 + i], max_tokens=60,
                               temperature=0) for i in range(2)]
        while srv.metric("pyengine_requests_running") < 2:
            time.sleep(0.01)
        srv.stop()
        for f in futures:
            with pytest.raises(openai.InternalServerError, match="shut down"):
                f.result(timeout=60)
    assert srv.error is None and srv.outcome[0].aborted == 2


def test_a_non_streaming_client_that_goes_away_aborts_its_request():
    import http.client

    server = InProcessServer(None, world=1, delay_s=0.05)  # 55 steps take ~3 s: it cannot finish first
    try:
        body = {"model": "tiny", "prompt": prompt_ids(2, 5), "max_tokens": 55, "temperature": 0}
        conn = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 20
        while server.metric("pyengine_kv_blocks_used") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # admitted and running
        conn.sock.shutdown(2)
        conn.close()
        aborted = 'pyengine_requests_finished_total{reason="abort"}'
        while time.monotonic() < deadline and not (server.metric(aborted) == 1
                                                   and server.metric("pyengine_kv_blocks_used") == 0):
            time.sleep(0.05)
        assert server.metric(aborted) == 1 and server.metric("pyengine_kv_blocks_used") == 0
    finally:
        server.stop()
