# Configures the code-interpreter layer once its packages are installed. Runs as root
# inside `chroot <overlay> /bin/sh -eu`, in private mount and pid namespaces (/proc and
# /dev mounted). Part of the `code-interpreter` recipe: changing this text changes the
# recipe hash.

# Byte-compile every installed Python module now. Debian's postinst scripts compile their
# own packages; this catches the rest, so no sandbox ever compiles on import (`user`
# cannot write /usr and would recompile on every start; root would write the .pyc files
# into its sandbox's layer). A few test files written for other Python versions do not
# compile; that is harmless.
pycs() { find /usr/lib/python3/dist-packages -name '*.pyc' | wc -l; }
before=$(pycs)
python3 -m compileall -q -j 0 /usr/lib/python3/dist-packages >/tmp/compileall.log 2>&1 \
    || echo "compileall: $(grep -c '^\*\*\*' /tmp/compileall.log || true) files did not compile"
rm -f /tmp/compileall.log
echo "byte-compiled: $(pycs) modules, $(($(pycs) - before)) of them now"

# matplotlib's font cache (~/.cache/matplotlib/fontlist-*.json) and config directory,
# built now for `user` and for root: without them the first `import matplotlib.pyplot`
# in every sandbox scans all fonts. Built as `user` so the files belong to uid 1000.
install -d -o user -g user -m 0755 /home/user/.cache /home/user/.config
setpriv --reuid=user --regid=user --init-groups \
    env HOME=/home/user USER=user LOGNAME=user \
    python3 -c 'import matplotlib, matplotlib.pyplot; print("font cache for user:", matplotlib.get_cachedir())'
HOME=/root python3 -c 'import matplotlib, matplotlib.pyplot; print("font cache for root:", matplotlib.get_cachedir())'

node -e 'console.log("node " + process.version)'
