# Installs the packages of a layered template on top of its parent's layers. Runs as root
# inside `chroot <overlay> /bin/sh -eu`, in private mount and pid namespaces, with /proc,
# /dev, the host's resolv.conf and the build's .deb cache mounted. Environment:
# CUBICLE_MIRROR, CUBICLE_SUITE, CUBICLE_STUBS and CUBICLE_PACKAGES (space separated).
# Part of every layered recipe: changing this text changes their recipe hashes.

# The mirror of this build, not whatever the parent's sources.list names; the list lives
# in /tmp, which the trim step empties.
sources=/tmp/cubicle-sources.list
echo "deb $CUBICLE_MIRROR $CUBICLE_SUITE main" > "$sources"
set -- -o "Dir::Etc::SourceList=$sources" -o Dir::Etc::SourceParts=- \
    -o APT::Sandbox::User=root -o Acquire::Retries=3 \
    -o Dpkg::Options::=--force-unsafe-io -o Dpkg::Use-Pty=0
apt-get "$@" -q update

# Empty stand-ins for dependencies the template does not need at run time: same name,
# the mirror's version plus "+cubicle.stub" (so apt sees them as installed and newer).
for pkg in ${CUBICLE_STUBS:-}; do
    version=$(apt-cache "$@" show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n 1)
    if [ -z "$version" ]; then
        echo "$pkg is not in $CUBICLE_MIRROR $CUBICLE_SUITE: nothing to stand in for" >&2
        exit 1
    fi
    stub=/tmp/cubicle-stub/$pkg
    mkdir -p "$stub/DEBIAN"
    cat > "$stub/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version+cubicle.stub
Architecture: all
Maintainer: Cubicle <root@localhost>
Section: misc
Priority: optional
Description: empty stand-in installed by cubicle
 Debian declares this package as a dependency of packages of this template,
 which do not need it at run time. Install the real one with
 apt-get install --allow-downgrades $pkg=$version
CONTROL
    dpkg-deb --root-owner-group --build "$stub" "/tmp/cubicle-stub/$pkg.deb" >/dev/null
    dpkg --force-unsafe-io -i "/tmp/cubicle-stub/$pkg.deb"
done
rm -rf /tmp/cubicle-stub

# shellcheck disable=SC2086 # a list of package names
apt-get "$@" -q -y --no-install-recommends install $CUBICLE_PACKAGES
rm -f "$sources"
echo "installed: $CUBICLE_PACKAGES"
