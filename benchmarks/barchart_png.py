"""A dependency-free horizontal bar chart written as PNG (zlib + struct only).

Used for results.png so that `make bench` needs nothing beyond torch. Text is drawn with
a built-in 5x7 pixel font (upper case, digits, a little punctuation; a lower-case 'x' for
ratios), scaled 2x.

    chart = Chart("title")
    sec = chart.section("float32, forward+backward")
    col = sec.column("time per step (bar: relative to the slowest path of the shape)")
    grp = col.group("resnet34-resnet18  B=32")
    grp.bar("reference", value=12.0, text="12.0 ms", color=(120, 120, 120))
    png_bytes = chart.render()

Within a section, every column must hold the same groups and bars in the same order
(they are drawn as aligned rows); each group's bars are scaled to that group's largest.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

Color = Tuple[int, int, int]

_FONT = {  # 5x7 glyphs: 7 rows, 5 bits each (bit 4 = leftmost column)
    ' ': (0, 0, 0, 0, 0, 0, 0),
    '0': (0xe, 0x11, 0x13, 0x15, 0x19, 0x11, 0xe),
    '1': (0x4, 0xc, 0x4, 0x4, 0x4, 0x4, 0xe),
    '2': (0xe, 0x11, 0x1, 0x2, 0x4, 0x8, 0x1f),
    '3': (0x1f, 0x2, 0x4, 0x2, 0x1, 0x11, 0xe),
    '4': (0x2, 0x6, 0xa, 0x12, 0x1f, 0x2, 0x2),
    '5': (0x1f, 0x10, 0x1e, 0x1, 0x1, 0x11, 0xe),
    '6': (0x6, 0x8, 0x10, 0x1e, 0x11, 0x11, 0xe),
    '7': (0x1f, 0x1, 0x2, 0x4, 0x8, 0x8, 0x8),
    '8': (0xe, 0x11, 0x11, 0xe, 0x11, 0x11, 0xe),
    '9': (0xe, 0x11, 0x11, 0xf, 0x1, 0x2, 0xc),
    'A': (0xe, 0x11, 0x11, 0x11, 0x1f, 0x11, 0x11),
    'B': (0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e),
    'C': (0xe, 0x11, 0x10, 0x10, 0x10, 0x11, 0xe),
    'D': (0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c),
    'E': (0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f),
    'F': (0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10),
    'G': (0xe, 0x11, 0x10, 0x17, 0x11, 0x11, 0xf),
    'H': (0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11),
    'I': (0xe, 0x4, 0x4, 0x4, 0x4, 0x4, 0xe),
    'J': (0x7, 0x2, 0x2, 0x2, 0x2, 0x12, 0xc),
    'K': (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    'L': (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f),
    'M': (0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11),
    'N': (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    'O': (0xe, 0x11, 0x11, 0x11, 0x11, 0x11, 0xe),
    'P': (0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10),
    'Q': (0xe, 0x11, 0x11, 0x11, 0x15, 0x12, 0xd),
    'R': (0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11),
    'S': (0xf, 0x10, 0x10, 0xe, 0x1, 0x1, 0x1e),
    'T': (0x1f, 0x4, 0x4, 0x4, 0x4, 0x4, 0x4),
    'U': (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xe),
    'V': (0x11, 0x11, 0x11, 0x11, 0x11, 0xa, 0x4),
    'W': (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0xa),
    'X': (0x11, 0x11, 0xa, 0x4, 0xa, 0x11, 0x11),
    'Y': (0x11, 0x11, 0x11, 0xa, 0x4, 0x4, 0x4),
    'Z': (0x1f, 0x1, 0x2, 0x4, 0x8, 0x10, 0x1f),
    'x': (0, 0, 0x11, 0xa, 0x4, 0xa, 0x11),  # only after a digit: "2.5x", "7x7"
    '-': (0, 0, 0, 0x1f, 0, 0, 0),
    '.': (0, 0, 0, 0, 0, 0xc, 0xc),
    ',': (0, 0, 0, 0, 0xc, 0x4, 0x8),
    ':': (0, 0xc, 0xc, 0, 0xc, 0xc, 0),
    '(': (0x2, 0x4, 0x8, 0x8, 0x8, 0x4, 0x2),
    ')': (0x8, 0x4, 0x2, 0x2, 0x2, 0x4, 0x8),
    '/': (0, 0x1, 0x2, 0x4, 0x8, 0x10, 0),
    '%': (0x18, 0x19, 0x2, 0x4, 0x8, 0x13, 0x3),
    '_': (0, 0, 0, 0, 0, 0, 0x1f),
    '+': (0, 0x4, 0x4, 0x1f, 0x4, 0x4, 0),
    '=': (0, 0, 0x1f, 0, 0x1f, 0, 0),
    '>': (0x8, 0x4, 0x2, 0x1, 0x2, 0x4, 0x8),
    '<': (0x2, 0x4, 0x8, 0x10, 0x8, 0x4, 0x2),
    '*': (0, 0x4, 0x15, 0xe, 0x15, 0x4, 0),
    '?': (0xe, 0x11, 0x1, 0x2, 0x4, 0, 0x4),
    '!': (0x4, 0x4, 0x4, 0x4, 0x4, 0, 0x4),
    "'": (0x4, 0x4, 0x8, 0, 0, 0, 0),
    ';': (0, 0xc, 0xc, 0, 0xc, 0x4, 0x8),
    '^': (0x4, 0xa, 0x11, 0, 0, 0, 0),
    '#': (0xa, 0xa, 0x1f, 0xa, 0x1f, 0xa, 0xa),
}
SCALE = 2
CHAR_W = 6 * SCALE          # 5 columns + 1 of spacing
LINE_H = 11 * SCALE         # 7 rows + spacing
WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
GRID: Color = (225, 225, 225)


def text_width(text: str) -> int:
    return len(text) * CHAR_W


class Canvas:
    def __init__(self, width: int, height: int, background: Color = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        x0, x1 = max(0, x0), min(self.width, x1)
        y0, y1 = max(0, y0), min(self.height, y1)
        if x1 <= x0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = 3 * (y * self.width + x0)
            self.pixels[start:start + len(row)] = row

    def text(self, x: int, y: int, text: str, color: Color = BLACK) -> None:
        prev = ""
        for ch in text:
            key = ch if (ch != "x" or prev.isdigit()) else "X"
            prev = ch
            glyph = _FONT.get(key) or _FONT.get(key.upper()) or _FONT["?"]
            for r, bits in enumerate(glyph):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + c * SCALE, y + r * SCALE, x + (c + 1) * SCALE,
                                  y + (r + 1) * SCALE, color)
            x += CHAR_W

    def png(self) -> bytes:
        raw = bytearray()
        stride = 3 * self.width
        for y in range(self.height):
            raw.append(0)  # filter: none
            raw += self.pixels[y * stride:(y + 1) * stride]

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b""))


@dataclass
class Bar:
    label: str
    value: Optional[float]      # None: no bar (failed or not run), `text` says why
    text: str
    color: Color


@dataclass
class Group:
    label: str
    bars: List[Bar] = field(default_factory=list)

    def bar(self, label: str, value: Optional[float], text: str, color: Color) -> Bar:
        b = Bar(label, value, text, color)
        self.bars.append(b)
        return b


@dataclass
class Column:
    title: str
    groups: List[Group] = field(default_factory=list)

    def group(self, label: str) -> Group:
        g = Group(label)
        self.groups.append(g)
        return g


@dataclass
class Section:
    heading: str
    columns: List[Column] = field(default_factory=list)

    def column(self, title: str) -> Column:
        c = Column(title)
        self.columns.append(c)
        return c


@dataclass
class Chart:
    title: str
    notes: List[str] = field(default_factory=list)
    sections: List[Section] = field(default_factory=list)
    bar_width: int = 260

    def section(self, heading: str) -> Section:
        s = Section(heading)
        self.sections.append(s)
        return s

    def render(self) -> bytes:
        pad, bar_h = 16, LINE_H - 4
        label_w = max([text_width(b.label) for s in self.sections for c in s.columns
                       for g in c.groups for b in g.bars] + [0]) + pad
        value_w = max([text_width(b.text) for s in self.sections for c in s.columns
                       for g in c.groups for b in g.bars] + [0]) + pad
        col_w = label_w + self.bar_width + 8 + value_w
        ncols = max([len(s.columns) for s in self.sections] + [1])
        width = max(pad * 2 + ncols * col_w + (ncols - 1) * pad,
                    pad * 2 + max([text_width(t) for t in [self.title] + self.notes]))
        height = pad + LINE_H * (1 + len(self.notes)) + pad
        for s in self.sections:
            rows = max([sum(1 + len(g.bars) for g in c.groups) for c in s.columns] + [0])
            height += LINE_H * (2 + rows) + pad
        canvas = Canvas(width, height)
        y = pad
        canvas.text(pad, y, self.title)
        y += LINE_H
        for note in self.notes:
            canvas.text(pad, y, note, (90, 90, 90))
            y += LINE_H
        for s in self.sections:
            y += pad
            canvas.rect(pad, y - 6, width - pad, y - 4, GRID)
            canvas.text(pad, y, s.heading)
            y += LINE_H
            bottom = y
            for ci, col in enumerate(s.columns):
                x = pad + ci * (col_w + pad)
                yy = y
                canvas.text(x, yy, col.title, (60, 60, 140))
                yy += LINE_H
                for g in col.groups:
                    canvas.text(x, yy, g.label, (0, 0, 0))
                    yy += LINE_H
                    top = max([b.value for b in g.bars if b.value is not None] + [0.0])
                    for b in g.bars:
                        canvas.text(x + 8, yy + 2, b.label, (50, 50, 50))
                        bx = x + label_w
                        canvas.rect(bx, yy, bx + self.bar_width, yy + bar_h, (246, 246, 246))
                        length = 0
                        if b.value is not None and top > 0:
                            length = max(1, int(round(self.bar_width * b.value / top)))
                            canvas.rect(bx, yy, bx + length, yy + bar_h, b.color)
                        canvas.text(bx + self.bar_width + 8, yy + 2, b.text, BLACK)
                        yy += LINE_H
                bottom = max(bottom, yy)
            y = bottom
        return canvas.png()
