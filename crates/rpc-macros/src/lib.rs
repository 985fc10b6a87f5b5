//! The `#[courier_rpc::service]` attribute. Use it through `courier-rpc`,
//! which re-exports it and documents what it generates.

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{parse_macro_input, FnArg, ItemTrait, Pat, ReturnType, TraitItem};

/// Turns a trait of `async fn`s into a Courier RPC service: the trait
/// (with `Send` futures, so servers can run calls concurrently), a typed
/// client `<Trait>Client`, a blocking client `<Trait>BlockingClient`, and
/// server dispatch `<Trait>Server`. See the `courier-rpc` crate docs.
///
/// Each method gets a fingerprint of its own, over the service's name, the
/// method's name and kind (unary, `#[oneway]`, streaming) and the serde
/// shapes of its argument tuple and result (or item) type.
/// `<Trait>Client::method_fingerprint(name) -> Option<u64>` returns it
/// (`None` for a name the trait lacks) and `<Trait>Client::METHODS` lists
/// the method names in declaration order. The client sends the called
/// method's fingerprint with each request; `<Trait>Server` implements
/// `Service::method_fingerprint` with the same values, so the server
/// refuses only calls of a method whose definition differs (see
/// "Versioning" in the `courier-rpc` crate docs).
///
/// # Arguments are owned
///
/// The server decodes a call's arguments from a buffer it drops once the
/// handler starts, and the client decodes results and stream items the
/// same way, so every argument, result and item type must own its data
/// (`serde::de::DeserializeOwned`): `String`, not `&str`; `Vec<u8>`, not
/// `&[u8]`; no references and no lifetimes other than `'static` anywhere in
/// the type. The attribute refuses a borrowed one with an error on it
/// ("arguments are deserialized into owned values: use String instead of
/// &str"), rather than leaving serde to report that `Deserialize` "is not
/// general enough". The other shapes it refuses, each with an error on the
/// offending item: a generic trait, an item that is not a method, a method
/// that is not `async fn`, has a default body or does not take `&self`
/// first, an argument that is a pattern rather than a name, an `Items<T>`
/// sink that is not the last parameter, an `Incoming<T>` stream that is
/// neither last nor just before the sink, a streaming method that returns
/// something, and a `#[oneway]` method that returns something or streams.
///
/// # The four shapes
///
/// - unary: `async fn get(&self, key: String) -> Value`;
/// - server streaming, a last parameter `Items<T>`: `async fn watch(&self,
///   key: String, items: Items<Value>)`, returning `()`; the client gets an
///   `ItemStream<T>`;
/// - client streaming, a last parameter `Incoming<T>`: `async fn sum(&self,
///   numbers: Incoming<u64>) -> u64`; the client gets a `ClientStream<T, R>`
///   to `send` to and `finish`;
/// - bidirectional, `Incoming<In>` then `Items<Out>`: `async fn chat(&self,
///   lines: Incoming<String>, replies: Items<String>)`, returning `()`; the
///   client gets an `(ItemSender<In>, ItemStream<Out>)`.
///
/// Client-streaming and bidirectional methods have no method on the
/// blocking client.
/// `crates/rpc/tests/ui/` holds a compile-fail test for each of the common
/// ones.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[service] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let service = parse_macro_input!(item as ItemTrait);
    match expand(service) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

struct Method {
    attrs: Vec<syn::Attribute>,
    name: syn::Ident,
    /// Every argument after `&self`, as the trait declares them.
    inputs: Vec<(syn::Ident, syn::Type)>,
    /// The arguments sent on the wire (all but a streaming sink).
    args: Vec<syn::Ident>,
    types: Vec<syn::Type>,
    output: syn::Type,
    /// For a streaming method: the sink parameter's name and the item type.
    stream: Option<(syn::Ident, syn::Type)>,
    /// For a client-streaming (or bidirectional) method: the `Incoming<T>`
    /// parameter's name and the item type.
    incoming: Option<(syn::Ident, syn::Type)>,
    /// Marked `#[oneway]`: the client sends it and waits for no reply.
    oneway: bool,
}

/// `T` if `ty` is `Items<T>` (by its last path segment).
fn item_type(ty: &syn::Type) -> Option<syn::Type> {
    wrapped(ty, "Items")
}

/// `T` if `ty` is `Incoming<T>` (by its last path segment).
fn incoming_type(ty: &syn::Type) -> Option<syn::Type> {
    wrapped(ty, "Incoming")
}

/// `T` if `ty` is `<wrapper><T>` (by its last path segment).
fn wrapped(ty: &syn::Type, wrapper: &str) -> Option<syn::Type> {
    let syn::Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != wrapper {
        return None;
    }
    let syn::PathArguments::AngleBracketed(generics) = &last.arguments else {
        return None;
    };
    match generics.args.first()? {
        syn::GenericArgument::Type(item) if generics.args.len() == 1 => Some(item.clone()),
        _ => None,
    }
}

/// The type an argument is decoded as on the server: `bytes::Bytes`
/// (written so, or `::bytes::Bytes`) decodes as `courier_rpc`'s
/// `SharedBytes`, the same on the wire but able to borrow the request's
/// frame instead of copying; every other type as itself. A bare `Bytes` is
/// left alone: it may be the user's own type of that name.
fn decoded_as(ty: &syn::Type) -> syn::Type {
    match is_bytes(ty) {
        true => syn::parse_quote!(::courier_rpc::__private::SharedBytes),
        false => ty.clone(),
    }
}

/// Whether `ty` is written as `bytes::Bytes` (see [`decoded_as`]).
fn is_bytes(ty: &syn::Type) -> bool {
    let syn::Type::Path(path) = ty else {
        return false;
    };
    let segments: Vec<String> = path
        .path
        .segments
        .iter()
        .map(|segment| match segment.arguments {
            syn::PathArguments::None => segment.ident.to_string(),
            _ => String::new(),
        })
        .collect();
    path.qself.is_none()
        && matches!(
            segments.iter().map(String::as_str).collect::<Vec<_>>()[..],
            ["bytes", "Bytes"]
        )
}

/// A type as the programmer would write it (`Vec<u8>`, not `Vec < u8 >`),
/// for error messages.
fn pretty(ty: &syn::Type) -> String {
    let text = quote!(#ty).to_string();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ' ' {
            let prev = out.chars().last();
            let next = chars.peek().copied();
            let glue_prev = matches!(prev, Some('<' | '&' | '[' | '(' | ':' | '\''));
            let glue_next = matches!(next, Some('<' | '>' | ',' | ']' | ')' | ';' | ':'));
            if glue_prev || glue_next {
                continue;
            }
        }
        out.push(c);
        if c == ',' || c == ';' {
            out.push(' ');
            while chars.peek() == Some(&' ') {
                chars.next();
            }
        }
    }
    out
}

/// The first borrow inside `ty` (a reference, or a lifetime other than
/// `'static`), as an error saying which owned type to use instead. `what`
/// names the values (`arguments`, `results`, `items`). Such a type is not
/// `DeserializeOwned`, which the generated code needs, and without this
/// check serde reports it as "implementation of `Deserialize` is not
/// general enough", far from the cause.
fn borrowed(ty: &syn::Type, what: &str) -> Option<syn::Error> {
    let owned = |advice: String| format!("{what} are deserialized into owned values: {advice}");
    let lifetime = |lifetime: &syn::Lifetime| {
        (lifetime.ident != "static").then(|| {
            syn::Error::new_spanned(
                lifetime,
                owned(format!(
                    "use a type that owns its data instead of one borrowing for `{lifetime}`"
                )),
            )
        })
    };
    match ty {
        syn::Type::Reference(reference) => {
            let elem = &*reference.elem;
            let advice = match elem {
                syn::Type::Path(path) if path.qself.is_none() && path.path.is_ident("str") => {
                    "use String instead of &str".to_string()
                }
                syn::Type::Path(path) if path.qself.is_none() && path.path.is_ident("Path") => {
                    "use PathBuf instead of &Path".to_string()
                }
                syn::Type::Slice(slice) => {
                    let item = pretty(&slice.elem);
                    format!("use Vec<{item}> instead of &[{item}]")
                }
                _ => {
                    let elem = pretty(elem);
                    format!("use {elem} instead of a reference to it")
                }
            };
            Some(syn::Error::new_spanned(reference, owned(advice)))
        }
        syn::Type::Path(path) => {
            if let Some(qself) = &path.qself {
                if let Some(err) = borrowed(&qself.ty, what) {
                    return Some(err);
                }
            }
            for segment in &path.path.segments {
                match &segment.arguments {
                    syn::PathArguments::None => {}
                    syn::PathArguments::AngleBracketed(generics) => {
                        for arg in &generics.args {
                            let found = match arg {
                                syn::GenericArgument::Lifetime(l) => lifetime(l),
                                syn::GenericArgument::Type(t) => borrowed(t, what),
                                syn::GenericArgument::AssocType(assoc) => borrowed(&assoc.ty, what),
                                _ => None,
                            };
                            if found.is_some() {
                                return found;
                            }
                        }
                    }
                    syn::PathArguments::Parenthesized(function) => {
                        for input in &function.inputs {
                            if let Some(err) = borrowed(input, what) {
                                return Some(err);
                            }
                        }
                        if let ReturnType::Type(_, output) = &function.output {
                            return borrowed(output, what);
                        }
                    }
                }
            }
            None
        }
        syn::Type::Array(array) => borrowed(&array.elem, what),
        syn::Type::Slice(slice) => borrowed(&slice.elem, what),
        syn::Type::Group(group) => borrowed(&group.elem, what),
        syn::Type::Paren(paren) => borrowed(&paren.elem, what),
        syn::Type::Ptr(pointer) => borrowed(&pointer.elem, what),
        syn::Type::Tuple(tuple) => tuple.elems.iter().find_map(|t| borrowed(t, what)),
        syn::Type::TraitObject(object) => object.bounds.iter().find_map(|bound| match bound {
            syn::TypeParamBound::Lifetime(l) => lifetime(l),
            _ => None,
        }),
        syn::Type::ImplTrait(bounds) => bounds.bounds.iter().find_map(|bound| match bound {
            syn::TypeParamBound::Lifetime(l) => lifetime(l),
            _ => None,
        }),
        _ => None,
    }
}

fn expand(service: ItemTrait) -> syn::Result<proc_macro2::TokenStream> {
    if !service.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &service.generics,
            "service traits cannot be generic",
        ));
    }
    let mut methods = Vec::new();
    for item in &service.items {
        let TraitItem::Fn(method) = item else {
            return Err(syn::Error::new_spanned(
                item,
                "a service trait holds only async methods",
            ));
        };
        let sig = &method.sig;
        if sig.asyncness.is_none() {
            return Err(syn::Error::new_spanned(
                sig,
                "service methods must be `async fn`",
            ));
        }
        if method.default.is_some() {
            return Err(syn::Error::new_spanned(
                method,
                "service methods cannot have default bodies",
            ));
        }
        let mut inputs = sig.inputs.iter();
        match inputs.next() {
            Some(FnArg::Receiver(receiver))
                if receiver.reference.is_some() && receiver.mutability.is_none() => {}
            _ => {
                return Err(syn::Error::new_spanned(
                    sig,
                    "service methods take `&self` first",
                ))
            }
        }
        let mut inputs = Vec::new();
        for input in sig.inputs.iter().skip(1) {
            let FnArg::Typed(typed) = input else {
                unreachable!("only the first argument can be a receiver")
            };
            let Pat::Ident(ident) = &*typed.pat else {
                return Err(syn::Error::new_spanned(
                    &typed.pat,
                    "arguments must be plain names",
                ));
            };
            inputs.push((ident.ident.clone(), (*typed.ty).clone()));
        }
        let output = match &sig.output {
            ReturnType::Default => syn::parse_quote!(()),
            ReturnType::Type(_, ty) => (**ty).clone(),
        };
        let mut stream = None;
        let mut incoming = None;
        for (position, (ident, ty)) in inputs.iter().enumerate() {
            if let Some(item) = incoming_type(ty) {
                let last = position + 1 == inputs.len();
                let before_sink =
                    position + 2 == inputs.len() && item_type(&inputs[position + 1].1).is_some();
                if !last && !before_sink {
                    return Err(syn::Error::new_spanned(
                        ty,
                        "an `Incoming<T>` stream must be the last parameter, or come just before an `Items<T>` sink",
                    ));
                }
                incoming = Some((ident.clone(), item));
            }
            if let Some(item) = item_type(ty) {
                if position + 1 != inputs.len() {
                    return Err(syn::Error::new_spanned(
                        ty,
                        "an `Items<T>` sink must be the last parameter",
                    ));
                }
                if !matches!(&sig.output, ReturnType::Default) {
                    return Err(syn::Error::new_spanned(
                        &sig.output,
                        "streaming methods return `()`; put failures in the item type",
                    ));
                }
                stream = Some((ident.clone(), item));
            }
        }
        let wire = &inputs
            [..inputs.len() - usize::from(stream.is_some()) - usize::from(incoming.is_some())];
        // Arguments are decoded on the server, results and items on the
        // client, each from a buffer that is gone once decoding ends: every
        // one of them must own its data.
        for (_, ty) in wire {
            if let Some(err) = borrowed(ty, "arguments") {
                return Err(err);
            }
        }
        for (_, item) in stream.iter().chain(&incoming) {
            if let Some(err) = borrowed(item, "items") {
                return Err(err);
            }
        }
        if let ReturnType::Type(_, ty) = &sig.output {
            if let Some(err) = borrowed(ty, "results") {
                return Err(err);
            }
        }
        let oneway = method.attrs.iter().any(|a| a.path().is_ident("oneway"));
        if oneway
            && (stream.is_some()
                || incoming.is_some()
                || !matches!(&sig.output, ReturnType::Default))
        {
            return Err(syn::Error::new_spanned(
                sig,
                "a #[oneway] method returns `()` and does not stream: nothing comes back",
            ));
        }
        methods.push(Method {
            attrs: method
                .attrs
                .iter()
                .filter(|a| !a.path().is_ident("oneway"))
                .cloned()
                .collect(),
            oneway,
            name: sig.ident.clone(),
            args: wire.iter().map(|(ident, _)| ident.clone()).collect(),
            types: wire.iter().map(|(_, ty)| ty.clone()).collect(),
            inputs,
            output,
            stream,
            incoming,
        });
    }

    let vis = &service.vis;
    let attrs = &service.attrs;
    let name = &service.ident;
    let name_str = name.to_string();
    let client = format_ident!("{}Client", name);
    let blocking = format_ident!("{}BlockingClient", name);
    let server = format_ident!("{}Server", name);

    let trait_methods = methods.iter().map(|m| {
        let (attrs, name, output) = (&m.attrs, &m.name, &m.output);
        let (names, types): (Vec<_>, Vec<_>) = m.inputs.iter().cloned().unzip();
        quote! {
            #(#attrs)*
            fn #name(&self, #(#names: #types),*) -> impl ::core::future::Future<Output = #output> + ::core::marker::Send;
        }
    });
    // One fingerprint per method, over the service's name, the method's
    // name (tagged `:stream` or `:oneway`, since a change of kind is a change
    // of contract), and the schemas of its argument tuple and result (or
    // item) type. The server compares the one a request carries with the
    // method it names, so methods evolve one by one.
    let fingerprint_parts = methods.iter().map(|m| {
        let types = &m.types;
        let output = &m.output;
        let (method, result) = match (&m.incoming, &m.stream) {
            (None, Some((_, item))) => (format!("{}:stream", m.name), quote!(#item)),
            (Some((_, input)), None) => (format!("{}:client_stream", m.name), quote!((#input, #output))),
            (Some((_, input)), Some((_, item))) => (format!("{}:bidi", m.name), quote!((#input, #item))),
            (None, None) if m.oneway => (format!("{}:oneway", m.name), quote!(())),
            (None, None) => (m.name.to_string(), quote!(#output)),
        };
        quote! {
            ::courier_rpc::__private::fingerprint(#name_str, &[(#method, ::courier_rpc::__private::schema::<(#(#types,)*)>(), ::courier_rpc::__private::schema::<#result>())])
        }
    });
    let method_count = methods.len();
    let method_names: Vec<String> = methods.iter().map(|m| m.name.to_string()).collect();
    let method_indices: Vec<usize> = (0..methods.len()).collect();
    let client_methods = methods.iter().enumerate().map(|(index, m)| {
        let Method { attrs, name, args, types, output, .. } = m;
        let method = name.to_string();
        if let Some((_, input)) = &m.incoming {
            return match &m.stream {
                Some((_, item)) => quote! {
                    #(#attrs)*
                    ///
                    /// Bidirectional: send items through the returned sender
                    /// while the handler's arrive through the stream (see
                    /// `courier_rpc::Client::call_bidi`).
                    pub async fn #name(&self, #(#args: #types),*) -> ::core::result::Result<(::courier_rpc::ItemSender<#input>, ::courier_rpc::ItemStream<#item>), ::courier_rpc::RpcError> {
                        self.inner.call_bidi::<(#(#types,)*), #input, #item>(#name_str, #method, Self::__fingerprints()[#index], &(#(#args,)*)).await
                    }
                },
                None => quote! {
                    #(#attrs)*
                    ///
                    /// Client streaming: send items through the returned
                    /// stream, then `finish` it for the reply (see
                    /// `courier_rpc::Client::call_client_stream`).
                    pub async fn #name(&self, #(#args: #types),*) -> ::core::result::Result<::courier_rpc::ClientStream<#input, #output>, ::courier_rpc::RpcError> {
                        self.inner.call_client_stream::<(#(#types,)*), #input, #output>(#name_str, #method, Self::__fingerprints()[#index], &(#(#args,)*)).await
                    }
                },
            };
        }
        match &m.stream {
            Some((_, item)) => quote! {
                #(#attrs)*
                pub async fn #name(&self, #(#args: #types),*) -> ::core::result::Result<::courier_rpc::ItemStream<#item>, ::courier_rpc::RpcError> {
                    self.inner.call_stream::<(#(#types,)*), #item>(#name_str, #method, Self::__fingerprints()[#index], &(#(#args,)*)).await
                }
            },
            None if m.oneway => quote! {
                #(#attrs)*
                ///
                /// One way: returns once the request is queued (see
                /// `courier_rpc::Client::notify`); no reply and no error
                /// from the server comes back.
                pub async fn #name(&self, #(#args: #types),*) -> ::core::result::Result<(), ::courier_rpc::RpcError> {
                    self.inner.notify::<(#(#types,)*)>(#name_str, #method, Self::__fingerprints()[#index], &(#(#args,)*)).await.map(|_| ())
                }
            },
            None => quote! {
                #(#attrs)*
                pub async fn #name(&self, #(#args: #types),*) -> ::core::result::Result<#output, ::courier_rpc::RpcError> {
                    self.inner.call::<(#(#types,)*), #output>(#name_str, #method, Self::__fingerprints()[#index], &(#(#args,)*)).await
                }
            },
        }
    });
    // Client-streaming and bidirectional methods have no blocking face:
    // they hand back a sender to use while the call runs, which wants a
    // runtime of the caller's.
    let blocking_methods = methods.iter().filter(|m| m.incoming.is_none()).map(|m| {
        let Method { attrs, name, args, types, output, .. } = m;
        match &m.stream {
            Some((_, item)) => quote! {
                #(#attrs)*
                pub fn #name(&self, #(#args: #types),*) -> ::core::result::Result<::courier_rpc::blocking::BlockingItems<'_, #item>, ::courier_rpc::RpcError> {
                    let stream = self.runtime.block_on(self.inner.#name(#(#args),*))?;
                    Ok(::courier_rpc::blocking::BlockingItems::new(stream, &self.runtime))
                }
            },
            None => quote! {
                #(#attrs)*
                pub fn #name(&self, #(#args: #types),*) -> ::core::result::Result<#output, ::courier_rpc::RpcError> {
                    self.runtime.block_on(self.inner.#name(#(#args),*))
                }
            },
        }
    });
    let dispatch_arms = methods.iter().map(|m| {
        let Method { name, args, types, .. } = m;
        let method = name.to_string();
        let (sink, call) = match (&m.incoming, &m.stream) {
            (None, Some((ident, item))) => (
                quote! { let #ident = __items.typed::<#item>(); },
                quote! { service.#name(#(#args,)* #ident).await; ::courier_rpc::__private::encode_reply(&()) },
            ),
            (Some((input_ident, input)), None) => (
                quote! {
                    let mut __items = __items;
                    let #input_ident = __items.incoming::<#input>()?;
                },
                quote! { ::courier_rpc::__private::encode_reply(&service.#name(#(#args,)* #input_ident).await) },
            ),
            (Some((input_ident, input)), Some((ident, item))) => (
                quote! {
                    let mut __items = __items;
                    let #input_ident = __items.incoming::<#input>()?;
                    let #ident = __items.typed::<#item>();
                },
                quote! { service.#name(#(#args,)* #input_ident, #ident).await; ::courier_rpc::__private::encode_reply(&()) },
            ),
            (None, None) => (quote! {}, quote! { ::courier_rpc::__private::encode_reply(&service.#name(#(#args),*).await) }),
        };
        let decoded = types.iter().map(decoded_as);
        let shared: Vec<&syn::Ident> = args
            .iter()
            .zip(types)
            .filter(|(_, ty)| is_bytes(ty))
            .map(|(arg, _)| arg)
            .collect();
        quote! {
            #method => {
                let (#(#args,)*): (#(#decoded,)*) = ::courier_rpc::__private::decode_args(args)?;
                #(let #shared = #shared.0;)*
                #sink
                let service = ::std::sync::Arc::clone(&self.0);
                ::core::result::Result::Ok(::std::boxed::Box::pin(async move { #call }))
            }
        }
    });

    Ok(quote! {
        #(#attrs)*
        #vis trait #name: ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#trait_methods)*
        }

        #[doc = concat!("Client for the `", #name_str, "` service: each method calls the remote one.")]
        #[derive(Clone, Debug)]
        #vis struct #client {
            inner: ::courier_rpc::Client,
        }

        impl #client {
            /// Calls go through `client` (one multiplexed connection).
            pub fn new(client: ::courier_rpc::Client) -> Self {
                Self { inner: client }
            }

            /// The untyped client underneath.
            pub fn client(&self) -> &::courier_rpc::Client {
                &self.inner
            }

            /// The same client with another deadline for each call.
            pub fn with_timeout(&self, timeout: ::std::time::Duration) -> Self {
                Self { inner: self.inner.with_timeout(timeout) }
            }

            /// The same client making calls without a deadline, for streams
            /// meant to live as long as the connection (see
            /// `courier_rpc::Client::without_deadline`).
            pub fn without_deadline(&self) -> Self {
                Self { inner: self.inner.without_deadline() }
            }

            /// The service's methods, in the order the trait declares them.
            pub const METHODS: &[&str] = &[#(#method_names),*];

            /// The fingerprint of `method` as this definition has it (over
            /// the service's name, the method's name and kind, and the serde
            /// shapes of its arguments and of its result or item type), or
            /// `None` if the service has no such method. Each request carries
            /// the fingerprint of the method it calls; pass this to
            /// `courier_rpc::Client::call`, `call_stream` or `notify` when
            /// calling by hand.
            pub fn method_fingerprint(method: &str) -> ::core::option::Option<u64> {
                match method {
                    #(#method_names => ::core::option::Option::Some(Self::__fingerprints()[#method_indices]),)*
                    _ => ::core::option::Option::None,
                }
            }

            /// Every method's fingerprint, in declaration order, traced once.
            /// (Underscored so as not to clash with a method of the service.)
            fn __fingerprints() -> &'static [u64; #method_count] {
                static FINGERPRINTS: ::std::sync::OnceLock<[u64; #method_count]> = ::std::sync::OnceLock::new();
                FINGERPRINTS.get_or_init(|| [#(#fingerprint_parts),*])
            }

            #(#client_methods)*
        }

        #[doc = concat!("Blocking client for the `", #name_str, "` service, for code without a runtime: each method blocks the thread until its call is answered (never call one from async code). Clones share the connection and the runtime. See `courier_rpc::blocking`.")]
        #[derive(Clone, Debug)]
        #vis struct #blocking {
            inner: #client,
            runtime: ::courier_rpc::blocking::Runtime,
        }

        impl #blocking {
            /// Connects to `address` on a runtime of its own (one worker
            /// thread, shared by this client's clones).
            pub fn connect(address: &::courier_rpc::Address, config: ::courier_rpc::ClientConfig) -> ::core::result::Result<Self, ::courier_rpc::RpcError> {
                Self::connect_on(&::courier_rpc::blocking::Runtime::new()?, address, config)
            }

            /// Connects to `address` on `runtime`, which any number of
            /// blocking clients can share.
            pub fn connect_on(runtime: &::courier_rpc::blocking::Runtime, address: &::courier_rpc::Address, config: ::courier_rpc::ClientConfig) -> ::core::result::Result<Self, ::courier_rpc::RpcError> {
                let client = runtime.block_on(::courier_rpc::Client::connect(address, config))?;
                Ok(Self::new(client, runtime.clone()))
            }

            /// Calls go through the existing `client` (its connection, shared
            /// with its other users), run on `runtime` (shared, or the
            /// caller's through `courier_rpc::blocking::Runtime::from_handle`).
            pub fn new(client: ::courier_rpc::Client, runtime: ::courier_rpc::blocking::Runtime) -> Self {
                Self { inner: #client::new(client), runtime }
            }

            /// The async client underneath, for async code sharing the
            /// connection.
            pub fn client(&self) -> &#client {
                &self.inner
            }

            /// The runtime calls run on.
            pub fn runtime(&self) -> &::courier_rpc::blocking::Runtime {
                &self.runtime
            }

            /// The same client (same connection and runtime) with another
            /// deadline for each call.
            pub fn with_timeout(&self, timeout: ::std::time::Duration) -> Self {
                Self { inner: self.inner.with_timeout(timeout), runtime: self.runtime.clone() }
            }

            /// The same client (same connection and runtime) making calls
            /// without a deadline (see `courier_rpc::Client::without_deadline`).
            pub fn without_deadline(&self) -> Self {
                Self { inner: self.inner.without_deadline(), runtime: self.runtime.clone() }
            }

            #(#blocking_methods)*
        }

        #[doc = concat!("Serves an implementation of `", #name_str, "`; register it with `courier_rpc::Server::service`.")]
        #vis struct #server<T>(::std::sync::Arc<T>);

        impl<T: #name> #server<T> {
            /// Wraps the implementation.
            pub fn new(service: T) -> Self {
                Self(::std::sync::Arc::new(service))
            }
        }

        impl<T: #name> ::courier_rpc::Service for #server<T> {
            fn name(&self) -> &'static str {
                #name_str
            }

            fn method_fingerprint(&self, method: &str) -> ::core::option::Option<u64> {
                #client::method_fingerprint(method)
            }

            fn call(&self, method: &str, args: &[u8], __items: ::courier_rpc::ItemSink) -> ::core::result::Result<::courier_rpc::__private::Reply, ::courier_rpc::RpcFault> {
                match method {
                    #(#dispatch_arms)*
                    other => ::core::result::Result::Err(::courier_rpc::RpcFault::UnknownMethod {
                        service: #name_str.into(),
                        method: other.into(),
                    }),
                }
            }
        }
    })
}
