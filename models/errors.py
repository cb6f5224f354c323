"""The one error type for a bad request parameter; the service maps it to HTTP 400."""


class InvalidParameter(ValueError):
    """A request parameter is out of range; `param` names it so the API can say which."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self):  # pickled as (param, message): it crosses to and from the engine process
        return type(self), (self.param, self.message)
