"""The one exception type that means "the user asked for something invalid"."""


class ConfigError(ValueError):
    """Invalid user input. The CLI prints its message as one line and exits with code 2."""


def choices_error(what: str, value: object, choices: list[str] | tuple[str, ...]) -> ConfigError:
    """A ConfigError naming the bad value and the valid choices."""
    return ConfigError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}")
