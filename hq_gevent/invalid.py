"""A request the server refuses for what it holds: the HTTP status (400 malformed, 422 invalid
value, 413, 415, ...) and the message the client gets as {"status": N, "error": message}."""


class Invalid(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message
