"""Packaging for noiseopt: all metadata lives in settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser

import setuptools
from packaging.version import Version

assert Version(setuptools.__version__) >= Version("36.2")

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

expected = ("version description keywords author author_email license status "
            "min_python audience language lib_name user").split()
missing = [k for k in expected if k not in cfg]
assert not missing, f"settings.ini is missing {missing}"

licenses = {
    "apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License"),
    "mit": ("MIT License", "OSI Approved :: MIT License"),
}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable",
            "6 - Mature", "7 - Inactive"]
py_versions = "3.10 3.11 3.12 3.13".split()

lic = licenses.get(cfg["license"].lower(), (cfg["license"], None))
min_python = cfg["min_python"]


def reqs(key):
    return cfg.get(key, "").split()


# every `<name>_requirements` key except the two nbdev ones becomes an extra: pip install noiseopt[<name>]
extras = {key[: -len("_requirements")]: reqs(key) for key in cfg
          if key.endswith("_requirements") and key not in ("requirements", "dev_requirements")}
extras["dev"] = reqs("dev_requirements")
extras["all"] = sorted({r for name, rs in extras.items() if name != "dev" for r in rs})

setuptools.setup(
    name=cfg["lib_name"],
    license=lic[0],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
    ]
    + [f"Programming Language :: Python :: {v}" for v in py_versions[py_versions.index(min_python):]]
    + ([f"License :: {lic[1]}"] if lic[1] else []),
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["noiseopt", "noiseopt.*"]),
    include_package_data=True,
    package_data={"noiseopt": ["assets/**/*"]},
    install_requires=reqs("requirements"),
    extras_require=extras,
    dependency_links=cfg.get("dep_links", "").split(),
    python_requires=">=" + min_python,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg.get('lib_path')}={cfg.get('lib_path')}._modidx:d"],
    },
    version=cfg["version"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    author=cfg["author"],
    author_email=cfg["author_email"],
)
