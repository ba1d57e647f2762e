"""The OpenAI-compatible backend (the `openai` client) against a scripted server on 127.0.0.1:
images, log-probabilities, and the failures the client retries or reports."""
import math
import time

import pytest

import common
import rationalrewards as rr
from conftest import dominant_colour, images_in, solid, text_in
from test_parsing import CLEAN_POINTWISE


def backend(server, **kw):
    return common.OpenAIBackend(server.url, "served-model", **{"timeout": 5.0, "max_retries": 2,
                                                                **kw})


def texts(b, msgs):
    """The replies' texts; the first failure's error raised."""
    outs = b.generate(msgs)
    for o in outs:
        if o.error:
            raise common.BackendError(o.error)
    return [o.text for o in outs]


def test_generate_sends_images_as_data_urls_in_order(scripted_server):
    server = scripted_server(
        lambda p: "colours: " + ",".join(dominant_colour(u) for u in images_in(p)))
    msgs = [
        rr.render_messages("pairwise_t2i", [solid("red"), solid("blue")], request="a red square"),
        rr.render_messages("pairwise_t2i", [solid("green"), solid("red")], request="a green square")
    ]
    out = backend(server).generate(msgs, max_new_tokens=77, temperature=0.1)
    assert [o.text for o in out] == ["colours: red,blue", "colours: green,red"]
    payload = server.requests[0]["payload"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert payload["model"] == "served-model"
    assert payload["max_tokens"] == 77
    assert payload["temperature"] == 0.1
    assert images_in(payload)[0].startswith("data:image/png;base64,")
    assert "a red square" in text_in(payload) or "a green square" in text_in(payload)


def test_images_are_bounded_before_sending(scripted_server):
    sizes = []

    def handler(p):
        import base64, io
        from PIL import Image
        raw = base64.b64decode(images_in(p)[0].split(",", 1)[1])
        sizes.append(Image.open(io.BytesIO(raw)).size)
        return "ok"
    server = scripted_server(handler)
    backend(server, max_pixels=50 * 50).generate(
        [rr.render_messages("pointwise_t2i", [solid("red", (400, 200))], request="x")])
    w, h = sizes[0]
    assert w * h <= 50 * 50 and abs(w / h - 2.0) < 0.1


def test_logprobs_path_returns_the_listed_logprobs_as_given(scripted_server):
    top = [{"token": "A", "logprob": math.log(0.6)}, {"token": " B", "logprob": math.log(0.2)},
           {"token": "The", "logprob": -3.0}]
    first = {"token": "A", "logprob": -0.1, "top_logprobs": top}
    body = {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [first]}}]}
    server = scripted_server(lambda p: body)
    [lp] = backend(server).answer_logprobs(
        [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])
    # not renormalised over {A, B} (parrot.log_p_label does that); " B" is read as B
    assert lp == {"A": pytest.approx(math.log(0.6)), "B": pytest.approx(math.log(0.2)),
                  "min_listed": -3.0}
    sent = server.requests[0]["payload"]
    assert sent["logprobs"] is True and sent["max_tokens"] == 1 and sent["temperature"] == 0.0


def test_answer_missing_from_top_logprobs_is_none_with_the_smallest_listed(scripted_server):
    # issue 7.2: P(A) = 0.135 with B not listed used to renormalise to P(A) = 1.0; the bound for B
    # travels with the answer, and parrot.log_p_label applies it
    top = [{"token": "The", "logprob": math.log(0.6)}, {"token": "A", "logprob": math.log(0.135)},
           {"token": "Image", "logprob": math.log(0.05)}]
    logprobs = {"content": [{"token": "The", "top_logprobs": top}]}
    server = scripted_server(lambda p: {"choices": [{"message": {"content": "The"},
                                                     "logprobs": logprobs}]})
    [lp] = backend(server).answer_logprobs(
        [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])
    assert lp == {"A": pytest.approx(math.log(0.135)), "B": None,
                  "min_listed": pytest.approx(math.log(0.05))}


def test_unreadable_answer_is_none_not_a_coin_flip(scripted_server):
    # issue 7.2: no logprobs and no A/B in the text used to give P = 0.5, which passed Phase 2
    server = scripted_server(lambda p: "I cannot tell.")
    msgs = [rr.render_messages("pointwise_t2i", [solid("red")], request="x")]
    assert backend(server).answer_logprobs(msgs) == [None]
    top_without_answers = [{"token": "The", "logprob": -0.1}, {"token": "I", "logprob": -2.0}]
    server = scripted_server(lambda p: {"choices": [{"message": {"content": "The"}, "logprobs": {
        "content": [{"token": "The", "top_logprobs": top_without_answers}]}}]})
    assert backend(server).answer_logprobs(msgs) == [None]


def test_logprobs_fall_back_to_answer_text(scripted_server):
    server = scripted_server(lambda p: "B")  # a server that ignores logprobs
    [lp] = backend(server).answer_logprobs(
        [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])
    assert lp == {"A": -math.inf, "B": 0.0}


def test_server_error_then_success_is_retried(scripted_server):
    replies = iter([500, 503, CLEAN_POINTWISE])
    server = scripted_server(lambda p: next(replies))
    scorer = rr.RationalRewardsScorer(backend(server), "t2i")
    [reward] = scorer.rewards([solid("red")], ["a red bicycle"])
    assert reward == pytest.approx(1.75 / 3)
    assert len(server.requests) == 3


def test_client_error_is_not_retried_and_is_clear(scripted_server):
    server = scripted_server(lambda p: 400)
    with pytest.raises(common.BackendError, match="BadRequestError: Error code: 400"):
        texts(backend(server), [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])
    assert len(server.requests) == 1


def test_server_that_never_answers_times_out_clearly(scripted_server):
    server = scripted_server(lambda p: ("hang", 3.0))
    with pytest.raises(common.BackendError, match="APITimeoutError"):
        texts(backend(server, timeout=0.3, max_retries=1),
              [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])
    assert len(server.requests) == 2  # the first try and one retry, then a clear error


def test_nothing_listening_is_a_clear_error():
    b = common.OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout=1.0, max_retries=1)
    with pytest.raises(common.BackendError,
                       match="request to http://127.0.0.1:9/v1 failed: APIConnectionError"):
        texts(b, [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])


def test_requests_in_flight_are_bounded(scripted_server):
    import threading
    live, peak, lock = [0], [0], threading.Lock()

    def handler(p):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return "ok"
    server = scripted_server(handler)
    msgs = [rr.render_messages("pointwise_t2i", [solid("red")], request=str(i)) for i in range(12)]
    assert texts(backend(server, max_concurrency=3), msgs) == ["ok"] * 12
    assert 1 < peak[0] <= 3


def test_answer_text_fallback_reads_image_b_and_reply_without_choices_is_clear(scripted_server):
    server = scripted_server(lambda p: "Image B is better.")
    [lp] = backend(server).answer_logprobs(
        [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])
    assert lp == {"A": -math.inf, "B": 0.0}
    server = scripted_server(lambda p: {"error": {"message": "model not found"}})
    # streamed, the server's error event is the client's APIError; it is not retried
    with pytest.raises(common.BackendError, match="APIError: model not found"):
        texts(backend(server), [rr.render_messages("pointwise_t2i", [solid("red")], request="x")])


def test_transformers_backend_does_not_change_the_callers_messages():
    model, processor = common.load_vlm("tiny-random")
    big = solid("red", (300, 200))
    msgs = [rr.render_messages("pointwise_t2i", [big], request="x")]
    backend = common.TransformersBackend(model, processor, max_pixels=32 * 32)
    backend.generate(msgs, max_new_tokens=2)
    assert msgs[0][-1]["content"][1]["image"] is big and big.size == (300, 200)


@pytest.mark.parametrize("reply", [["not", "an", "object"], {"choices": ["A"]},
                                   {"choices": [{"text": "A"}]}])
def test_json_that_is_not_a_chat_completion_is_a_clear_error(scripted_server, reply):
    # issue 7.13: these raised TypeError/AttributeError tracebacks deep in the backend
    server = scripted_server(lambda p: reply)
    msgs = [rr.render_messages("pointwise_t2i", [solid("red")], request="x")]
    with pytest.raises(common.BackendError, match="not a chat completion"):
        texts(backend(server), msgs)
    with pytest.raises(common.BackendError, match="not a chat completion"):
        backend(server).answer_logprobs(msgs)
    assert len(server.requests) == 2  # not retried: the same request would get the same answer


def test_null_content_is_counted_unreadable_with_a_warning(scripted_server, capsys):
    server = scripted_server(
        lambda p: {"choices": [{"message": {"role": "assistant", "content": None}}]})
    scorer = rr.RationalRewardsScorer(backend(server), "t2i")
    [c] = scorer.critique([solid("red")], ["x"])
    assert not c.readable and rr.reward_from_scores(c.scores) == 0.0
    assert "returned no text content" in capsys.readouterr().err
