"""Error classes and the mapping of model-side exceptions."""

from __future__ import annotations

import pickle

from services import errors as E


class TooLong(ValueError):
    def __init__(self, prompt_tokens, limit):
        self.prompt_tokens, self.limit = prompt_tokens, limit
        super().__init__("too long")


class BackPressureError(Exception):
    pass


class Wrapped(Exception):
    """Like Ray's RayTaskError: the original is on .cause."""

    def __init__(self, cause):
        super().__init__("wrapped")
        self.cause = cause


def test_mapping():
    assert E.to_service_error(RuntimeError("x")) is None
    e = E.to_service_error(TooLong(3000, 1024))
    assert isinstance(e, E.PromptTooLong) and e.status == 400 and e.code == "context_length_exceeded"
    assert "1024" in e.message and "3000" in e.message
    assert E.to_service_error(BackPressureError()).status == 503
    assert E.to_service_error(Wrapped(TooLong(5, 4))).status == 400
    assert E.to_service_error(Wrapped(E.NotFound("m"))).status == 404
    mine = E.Unauthorized("no")
    assert E.to_service_error(mine) is mine


def test_engine_class_is_recognised_when_loaded():
    from engine.decode import PromptTooLongError  # the module errors.py looks the class up in

    e = E.to_service_error(PromptTooLongError(2000, 1024))
    assert isinstance(e, E.PromptTooLong) and e.status == 400 and "2000" in e.message
    assert E._is_prompt_too_long(PromptTooLongError(2000, 1024))
    # by class, not only by shape: a subclass that hides the attributes is still recognised
    bare = type("Bare", (PromptTooLongError,), {"__getattribute__": _hide_shape})(2000, 1024)
    assert E._is_prompt_too_long(bare)


def _hide_shape(self, name):
    if name in ("prompt_tokens", "limit"):
        raise AttributeError(name)
    return object.__getattribute__(self, name)


def test_pickle_keeps_fields():
    e = E.RateLimited("slow down", kind="tokens", retry_after_s=2.5, param="p", headers={"x-a": "1"})
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is E.RateLimited
    assert (e2.message, e2.param, e2.type, e2.code, e2.retry_after_s) == ("slow down", "p", "tokens",
                                                                          "rate_limit_exceeded", 2.5)
    assert e2.headers["retry-after"] == "3" and e2.headers["retry-after-ms"] == "2500" and e2.headers["x-a"] == "1"
    assert e2.envelope() == e.envelope()


def test_validation_error_param_paths():
    err = E.validation_error([{"type": "int_type", "loc": ("body", "messages", 2, "content"), "msg": "bad"}])
    assert err.param == "messages[2].content" and err.status == 400
    err = E.validation_error([{"type": "extra_forbidden", "loc": ("body", "tools_x"), "msg": "x"}])
    assert err.param == "tools_x" and err.code == "unknown_parameter"
