import nbformat, hashlib
def build(cells, path):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    out = []
    for i, (kind, src, *tags) in enumerate(cells):
        src = src.strip("\n")
        cid = hashlib.sha1(f"{path}{i}{src[:40]}".encode()).hexdigest()[:8]
        if kind == "md":
            c = nbformat.v4.new_markdown_cell(src)
        else:
            c = nbformat.v4.new_code_cell(src)
            c.execution_count = None
            c.outputs = []
        c.id = cid
        c.metadata = {"tags": list(tags)} if tags else {}
        out.append(c)
    nb.cells = out
    nbformat.validate(nb)
    with open(path, "w") as f:
        nbformat.write(nb, f)
