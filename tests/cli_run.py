"""The captured result of one in-process or subprocess CLI run (shared by the CLI tests)."""

from dataclasses import dataclass


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    @property
    def note_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("note:")]
