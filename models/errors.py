"""The one error type for a bad request parameter (the service maps it to HTTP 400), and the
type checks that parameters and configs share."""


class InvalidParameter(ValueError):
    """A request parameter is out of range; `param` names it so the API can say which, and
    `code`, where clients look for one, says what kind of mistake it is (OpenAI's
    "context_length_exceeded", which clients read to trim a prompt and retry)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.code = code

    def __reduce__(self):  # pickled by its fields: it crosses to and from the engine process
        return type(self), (self.param, self.message, self.code)


def is_int(value: object) -> bool:
    """An integer, and not a bool (to Python, True is the integer 1; to a request, a mistake)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_unicode(param: str, text: str) -> None:
    """InvalidParameter when a string holds a lone surrogate (\\ud800-\\udfff): not valid Unicode,
    which the tokenizer refuses with a bare TypeError (the service refuses it in the JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameter(param, "contains a lone surrogate (\\ud800-\\udfff), which is not valid "
                                      "Unicode") from None
