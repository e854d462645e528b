"""Plain-text tables for the command line and reports."""


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned; the first left, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def plural(count: int, noun: str) -> str:
    """'1 window', '2 windows': a count with its noun."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
