//! The one way templates come to exist: [`build_template`] builds a template from a
//! [`TemplateSource`] — a built-in Debian [`Recipe`] (debootstrap, or a layer installed
//! with apt on its parent) or a container image — reporting its job phases
//! ([`BuildEvent::Phase`]: `unpacking`, then `building`; image pulls add `pulling`) and
//! installing it atomically through [`TemplateStore`]. `cubicle tpl build` and the
//! daemon's build jobs both call it; the daemon adds `queued`, `snapshotting` and the
//! final `ready` or `failed`.

use cubicle_core::TemplateName;

use crate::build::{BuildEvent, BuildOptions, BuildOutcome};
use crate::error::TemplateError;
use crate::from_image::{build_image, ImageBuildRequest};
use crate::recipe::Recipe;
use crate::store::TemplateStore;

/// What a template is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A built-in recipe; the template is named after it.
    Recipe(&'static Recipe),
    /// A container image, installed as the template `name`.
    Image {
        /// The template to make.
        name: TemplateName,
        /// The image and what to do with it.
        request: Box<ImageBuildRequest>,
    },
}

impl TemplateSource {
    /// The template the build makes.
    pub fn template_name(&self) -> Result<TemplateName, TemplateError> {
        match self {
            TemplateSource::Recipe(r) => r.template_name(),
            TemplateSource::Image { name, .. } => Ok(name.clone()),
        }
    }

    /// `recipe` or `image`, as a build job records it.
    pub fn kind(&self) -> &'static str {
        match self {
            TemplateSource::Recipe(_) => "recipe",
            TemplateSource::Image { .. } => "image",
        }
    }
}

/// Builds the template of `source` into `store` and installs it atomically; a failed
/// build leaves nothing of itself (and an existing template as it was).
///
/// A recipe whose template is current returns [`BuildOutcome::UpToDate`] unless
/// `opts.rebuild`. An image is always built: as a new template (its name must be free),
/// or with `opts.rebuild` as a replacement of the image template of that name.
/// `opts.mirror` applies to recipes only.
pub fn build_template(
    store: &TemplateStore,
    source: &TemplateSource,
    opts: &BuildOptions,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, TemplateError> {
    match source {
        TemplateSource::Recipe(recipe) => crate::build::build(store, recipe, opts, on_event),
        TemplateSource::Image { name, request } => {
            if opts.rebuild {
                // Only an image template is replaced by an image.
                let current = store.get_by_name(name)?;
                if current.meta.image.is_none() {
                    return Err(TemplateError::Exists {
                        name: name.to_string(),
                        reason: format!(
                            "was built from the recipe '{}', not from an image",
                            current.meta.recipe
                        ),
                    });
                }
            }
            build_image(store, request, name, opts.uid_shift, opts.rebuild, on_event)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::TemplateMeta;
    use cubicle_core::DataDir;

    #[test]
    fn only_image_templates_are_rebuilt_from_images() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(DataDir::new(tmp.path()));
        let dir = tmp.path().join("templates/mine");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let meta = TemplateMeta {
            format_version: 1,
            recipe: "base".into(),
            recipe_hash: "h".into(),
            uid_shift: 0,
            built_at: "2026-01-01T00:00:00Z".into(),
            size_bytes: 1,
            file_count: 1,
            build_seconds: 0.1,
            mirror: String::new(),
            parent: None,
            parent_built_at: None,
            aliases: Vec::new(),
            code_interpreter: false,
            image: None,
            sandbox: Default::default(),
        };
        std::fs::write(
            dir.join("template.json"),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        let source = TemplateSource::Image {
            name: "mine".parse().unwrap(),
            request: Box::new(ImageBuildRequest {
                image: "/nowhere".into(),
                ..Default::default()
            }),
        };
        assert_eq!(source.kind(), "image");
        assert_eq!(source.template_name().unwrap().as_str(), "mine");
        let opts = BuildOptions {
            rebuild: true,
            ..BuildOptions::default()
        };
        let err = build_template(&store, &source, &opts, &mut |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "template 'mine' was built from the recipe 'base', not from an image"
        );
        // Without rebuild, the name is taken.
        let err =
            build_template(&store, &source, &BuildOptions::default(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("exists already"), "{err}");
        let base = TemplateSource::Recipe(&crate::recipe::BASE);
        assert_eq!(base.template_name().unwrap().as_str(), "base");
        assert_eq!(base.kind(), "recipe");
    }

    #[test]
    fn phases_parse_and_print() {
        use crate::BuildPhase;
        for p in BuildPhase::ALL {
            assert_eq!(p.as_str().parse::<BuildPhase>().unwrap(), p);
            assert_eq!(p.to_string(), p.as_str());
        }
        assert!("nope".parse::<BuildPhase>().is_err());
    }
}
