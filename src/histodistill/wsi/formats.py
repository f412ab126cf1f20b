"""File suffixes of slides, in a module without heavy imports so command-line parsers can name them."""

# What a folder scan picks up: OpenSlide's formats and the plain images read as one-level slides.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".qptiff",
    ".png",
    ".jpg",
    ".jpeg",
)
