"""The errors a method (or the toolkit) raises for bad input; each message names the value
and what would be valid. The command line prints them as one line, without a traceback."""

from __future__ import annotations


class BudgetError(ValueError):
    """An infeasible budget request; the message names the value and the nearest feasible ones."""


class OptionError(ValueError):
    """A method option (``methods: [{name, options}]``) that cannot be used."""


class ComponentError(ValueError):
    """A component folder (a part trained by an earlier job) that cannot be used here; the
    message names the folder and the field."""


class CountMismatchError(RuntimeError):
    """A method's analytic parameter count disagrees with its real modules."""


class UnknownMethodError(KeyError):
    """A method name that no built-in module, entry point or plugin registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(ImportError):
    """A plugin that cannot be imported or registers nothing; the message says which and why."""
